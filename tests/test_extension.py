"""rmt_fast._C's ops against their pure-torch twins and an obviously-right float64 loop, and the
CUDA sources against nvcc. Tests of the extension skip, with the reason, when it is not built; the
torch twins are tested either way (the engine falls back to them)."""
import glob
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from rmt_fast import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
requires_ext = pytest.mark.skipif(not _ext.available(),
                                  reason=f"rmt_fast._C not available: {_ext.why_unavailable()}")
# Every behavioural test runs on both implementations; the op's cases skip without the extension.
IMPLS = [pytest.param("op", marks=requires_ext), "torch"]
FNS = {
    "op": (_ext.segment_embed_op, _ext.memory_write_op, _ext.memory_reset_op),
    "torch": (_ext.segment_embed_torch, _ext.memory_write_torch, _ext.memory_reset_torch),
}

# The output is rounded once from float32: allow one unit in the last place of the output dtype.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2**-7, rtol=2**-7),
    torch.float16: dict(atol=2**-10, rtol=2**-10),
}
EPS = 1e-12  # BERT's LayerNorm eps


def _device_or_skip(device):
    if device == "cuda" and not _ext.built_with_cuda():
        pytest.skip(_ext.why_unavailable("cuda"))


# --- segment_embed --------------------------------------------------------------------------------

def make_embed_inputs(B, T, M, H, V=50, P=None, table_dtype=torch.float32, out_dtype=torch.float32,
                      device="cpu"):
    P = T + 3 if P is None else P
    ids = torch.randint(0, V, (B, T), device=device)
    ids[:, 1:1 + M] = -7  # memory rows: never read, so any value must do
    tables = dict(
        memory=torch.randn(B, M, H, device=device),
        word_emb=torch.randn(V, H, device=device).to(table_dtype),
        pos_emb=torch.randn(P, H, device=device).to(table_dtype),
        type_emb0=torch.randn(H, device=device).to(table_dtype),
        ln_weight=(1 + 0.5 * torch.randn(H, device=device)).to(table_dtype),
        ln_bias=(0.1 * torch.randn(H, device=device)).to(table_dtype),
    )
    out = torch.full((B, T, H), float("nan"), dtype=out_dtype, device=device)  # poisoned
    return dict(ids=ids, **tables, eps=EPS, out=out)


def segment_embed_reference(ids, memory, word_emb, pos_emb, type_emb0, ln_weight, ln_bias, eps, out):
    """Row by row in float64, straight from the definition."""
    B, T = ids.shape
    M = memory.shape[1]
    rows = []
    for b in range(B):
        for t in range(T):
            x = memory[b, t - 1] if 1 <= t <= M else word_emb[ids[b, t]]
            e = x.double() + pos_emb[t].double() + type_emb0.double()
            mean = e.mean()
            var = ((e - mean) ** 2).mean()
            rows.append((e - mean) / torch.sqrt(var + eps) * ln_weight.double() + ln_bias.double())
    return torch.stack(rows).reshape(out.shape)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("out_dtype", list(TOL), ids=str)
@pytest.mark.parametrize("H", [1, 31, 384, 768])
@pytest.mark.parametrize("T,M", [(1, 3), (7, 3), (7, 10), (13, 5), (13, 10)])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("device", DEVICES)
def test_segment_embed_matches_float64_reference(device, B, T, M, H, out_dtype, impl):
    _device_or_skip(device)
    args = make_embed_inputs(B, T, M, H, out_dtype=out_dtype, device=device)
    expected = segment_embed_reference(**args)
    result = FNS[impl][0](**args)
    assert result is args["out"]
    assert torch.isfinite(result).all(), "some rows of out were not written"
    torch.testing.assert_close(result.double(), expected, **TOL[out_dtype])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("out_dtype", list(TOL), ids=str)
@pytest.mark.parametrize("table_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("H", [31, 768])
@pytest.mark.parametrize("device", DEVICES)
def test_segment_embed_low_precision_tables(device, H, table_dtype, out_dtype, impl):
    # Tables up-convert exactly, so the result is as close to the reference as with float32 tables.
    _device_or_skip(device)
    args = make_embed_inputs(3, 13, 10, H, table_dtype=table_dtype, out_dtype=out_dtype, device=device)
    expected = segment_embed_reference(**args)
    torch.testing.assert_close(FNS[impl][0](**args).double(), expected, **TOL[out_dtype])


@requires_ext
@pytest.mark.parametrize("out_dtype", list(TOL), ids=str)
@pytest.mark.parametrize("T,M", [(1, 10), (7, 3), (13, 10)])
@pytest.mark.parametrize("device", DEVICES)
def test_segment_embed_op_matches_torch_twin(device, T, M, out_dtype):
    _device_or_skip(device)
    args = make_embed_inputs(3, T, M, 384, out_dtype=out_dtype, device=device)
    twin = _ext.segment_embed_torch(**{**args, "out": args["out"].clone()})
    torch.testing.assert_close(_ext.segment_embed_op(**args), twin, **TOL[out_dtype])


@pytest.mark.parametrize("impl", IMPLS)
def test_segment_embed_strided_inputs(impl):
    # Views that are not contiguous (a memory slice, transposed tables) give the same rows.
    B, T, M, H = 3, 13, 4, 31
    args = make_embed_inputs(B, T, M, H)
    args["memory"] = torch.randn(B, 2 * M, H)[:, ::2]
    args["word_emb"] = args["word_emb"].t().contiguous().t()
    args["pos_emb"] = torch.randn(H, 2 * T).t()
    args["ids"] = torch.randint(0, 50, (T, B)).t()
    expected = segment_embed_reference(**args)
    torch.testing.assert_close(FNS[impl][0](**args).double(), expected, **TOL[torch.float32])


@pytest.mark.parametrize("impl", IMPLS)
def test_segment_embed_is_batch_invariant(impl):
    args = make_embed_inputs(3, 13, 10, 384)
    full = FNS[impl][0](**args).clone()
    one = {k: (v[1:2] if k in ("ids", "memory") else v) for k, v in args.items()}
    one["out"] = torch.full((1, 13, 384), float("nan"))
    torch.testing.assert_close(FNS[impl][0](**one), full[1:2], atol=0, rtol=0)


def _embed_case(change):
    def make():
        args = make_embed_inputs(2, 7, 3, 31, V=50)
        change(args)
        return args
    return make


def _set(key, value_fn):
    def change(args):
        args[key] = value_fn(args[key])
    return change


def _bad_id(args):
    args["ids"][1, 5] = 50


def _negative_id(args):
    args["ids"][0, 0] = -1


BAD_EMBED = {
    "ids float": (_set("ids", lambda x: x.float()), r"ids must be (Long|torch\.int64)"),
    "ids 1-D": (_set("ids", lambda x: x[0]), r"ids must be 2-D, got shape \[7\]"),
    "memory hidden size": (_set("memory", lambda x: x[..., :5]),
                           r"memory must have shape \(B, M, H\) = \[2, 3, 31\], got \[2, 3, 5\]"),
    "memory batch": (_set("memory", lambda x: x[:1]),
                     r"memory must have shape \(B, M, H\) = \[2, 3, 31\], got \[1, 3, 31\]"),
    "memory bfloat16": (_set("memory", lambda x: x.bfloat16()), r"memory must be .*"),
    "pos_emb too short": (_set("pos_emb", lambda x: x[:5]),
                          r"pos_emb has P = 5 positions but the segment has T = 7 rows"),
    "pos_emb hidden size": (_set("pos_emb", lambda x: x[:, :4]), r"pos_emb must have shape \(P, H\)"),
    "ln_weight shape": (_set("ln_weight", lambda x: x[:30]),
                        r"ln_weight must have shape \(H\) = \[31\], got \[30\]"),
    "pos_emb dtype": (_set("pos_emb", lambda x: x.half()), r"pos_emb must be .*, got .*"),
    "word_emb float64": (_set("word_emb", lambda x: x.double()),
                         r"word_emb must be float32, bfloat16 or float16"),
    "out shape": (_set("out", lambda x: x[:, :6]),
                  r"out must have shape \(B, T, H\) = \[2, 7, 31\], got \[2, 6, 31\]"),
    "out int": (_set("out", lambda x: x.int()), r"out must be float32, bfloat16 or float16"),
    "out strided": (_set("out", lambda x: torch.full((2, 31, 7), float("nan")).transpose(1, 2)),
                    r"out must be contiguous"),
    "eps negative": (_set("eps", lambda x: -1.0), r"eps must be >= 0"),
    "id too large": (_bad_id, r"ids\[1, 5\] = 50 is out of range for word_emb with V = 50 rows"),
    "id negative": (_negative_id, r"ids\[0, 0\] = -1 is out of range"),
    "ids on meta": (_set("ids", lambda x: x.to("meta")),
                    r"ids is on meta but out is on cpu; all tensors must be on one device"),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(BAD_EMBED))
def test_segment_embed_rejects_bad_inputs(case, impl):
    change, pattern = BAD_EMBED[case]
    args = _embed_case(change)()
    with pytest.raises(RuntimeError, match=r"rmt_fast::segment_embed: " + pattern):
        FNS[impl][0](**args)
    if args["out"].dtype.is_floating_point and args["out"].device.type == "cpu":
        assert torch.isnan(args["out"]).all(), "a rejected call must write nothing"


# --- memory_write ---------------------------------------------------------------------------------

def memory_write_reference(state, hidden, row_offset, slots):
    expected = state.clone()
    M = state.shape[1]
    for b, s in enumerate(slots.tolist()):
        if s >= 0:
            expected[s] = hidden[b, row_offset:row_offset + M].double().float()
    return expected


def make_slots(S, B, pattern, device):
    slots = torch.randperm(max(S, B), device=device)[:B]
    slots[slots >= S] = -1
    if pattern == "some -1":
        slots[::2] = -1
    elif pattern == "all -1":
        slots[:] = -1
    return slots


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=str)
@pytest.mark.parametrize("pattern", ["all write", "some -1", "all -1"])
@pytest.mark.parametrize("H", [1, 31, 384])
@pytest.mark.parametrize("S,B,M", [(1, 1, 3), (4, 3, 10), (5, 1, 7), (3, 3, 4)])
@pytest.mark.parametrize("device", DEVICES)
def test_memory_write(device, S, B, M, H, pattern, hidden_dtype, impl):
    _device_or_skip(device)
    row_offset, R = 1, M + 3
    state = torch.randn(S, M, H, device=device)
    hidden = torch.randn(B, R, H, device=device).to(hidden_dtype)
    slots = make_slots(S, B, pattern, device)
    state[slots[slots >= 0]] = float("nan")  # poison what is about to be written
    expected = memory_write_reference(state, hidden, row_offset, slots)
    assert FNS[impl][1](state, hidden, row_offset, slots) is None
    torch.testing.assert_close(state, expected, atol=0, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_memory_write_strided_hidden(impl):
    S, B, M, H, R = 4, 3, 10, 31, 16
    state = torch.randn(S, M, H)
    hidden = torch.randn(B, H, R).transpose(1, 2)  # [B, R, H], strides (H*R, 1, R)
    slots = torch.tensor([3, -1, 0])
    expected = memory_write_reference(state, hidden, R - M, slots)
    FNS[impl][1](state, hidden, R - M, slots)
    torch.testing.assert_close(state, expected, atol=0, rtol=0)


def _write_args(**over):
    S, B, M, H = 4, 3, 10, 31
    args = dict(state=torch.randn(S, M, H), hidden=torch.randn(B, M + 1, H), row_offset=1,
                slots=torch.tensor([2, -1, 0]))
    args.update({k: v(args[k]) for k, v in over.items()})
    return args


BAD_WRITE = {
    "state float64": (dict(state=lambda x: x.double()), r"state must be .*"),
    "state strided": (dict(state=lambda x: x.transpose(0, 1).contiguous().transpose(0, 1)),
                      r"state must be contiguous"),
    "state 2-D": (dict(state=lambda x: x[0]), r"state must be 3-D"),
    "hidden H": (dict(hidden=lambda x: x[..., :30]),
                 r"hidden must have shape \(B, R, H\) with B = slots.size\(0\) = 3 and "
                 r"H = state.size\(2\) = 31, got \[3, 11, 30\]"),
    "hidden B": (dict(hidden=lambda x: x[:2]), r"hidden must have shape \(B, R, H\)"),
    "hidden int": (dict(hidden=lambda x: x.int()), r"hidden must be float32, bfloat16, float16"),
    "row_offset past the end": (dict(row_offset=lambda x: 2),
                                r"rows row_offset \.\. row_offset \+ M - 1 = 2 \.\. 11 must lie "
                                r"within hidden's R = 11 rows"),
    "row_offset negative": (dict(row_offset=lambda x: -1),
                            r"rows row_offset .* = -1 \.\. 8 must lie within hidden's R = 11 rows"),
    "slots int32": (dict(slots=lambda x: x.int()), r"slots must be .*"),
    "slots 2-D": (dict(slots=lambda x: x[None]), r"slots must be 1-D"),
    "slot too large": (dict(slots=lambda x: torch.tensor([2, 4, 0])),
                       r"slots\[1\] = 4 is out of range for state with S = 4 slots"),
    "slot written twice": (dict(slots=lambda x: torch.tensor([2, -1, 2])),
                           r"slots\[0\] and slots\[2\] both write slot 2"),
    "slots on meta": (dict(slots=lambda x: x.to("meta")),
                      r"slots is on meta but state is on cpu; all tensors must be on one device"),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(BAD_WRITE))
def test_memory_write_rejects_bad_inputs(case, impl):
    over, pattern = BAD_WRITE[case]
    args = _write_args(**over)
    before = args["state"].clone()
    with pytest.raises(RuntimeError, match=r"rmt_fast::memory_write: " + pattern):
        FNS[impl][1](**args)
    if args["state"].shape == before.shape:
        torch.testing.assert_close(args["state"], before, atol=0, rtol=0)  # nothing written


# --- memory_reset ---------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("init_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=str)
@pytest.mark.parametrize("H", [1, 31, 768])
@pytest.mark.parametrize("S,M", [(1, 3), (5, 10), (7, 4)])
@pytest.mark.parametrize("device", DEVICES)
def test_memory_reset(device, S, M, H, init_dtype, impl):
    _device_or_skip(device)
    state = torch.randn(S, M, H, device=device)
    init = torch.randn(M, H, device=device).to(init_dtype)
    reset = torch.rand(S, device=device) < 0.5
    reset[0] = True
    state[reset] = float("nan")  # poison what is about to be reset
    expected = state.clone()
    for s in range(S):
        if reset[s]:
            expected[s] = init.double().float()
    assert FNS[impl][2](state, init, reset) is None
    torch.testing.assert_close(state, expected, atol=0, rtol=0)


BAD_RESET = {
    "init shape": (dict(init=lambda x: x[:, :30]), r"init must have shape \(M, H\) = \[4, 31\], got \[4, 30\]"),
    "init int": (dict(init=lambda x: x.long()), r"init must be float32, bfloat16, float16"),
    "reset shape": (dict(reset=lambda x: x[:2]), r"reset must have shape \(S\) = \[3\], got \[2\]"),
    "reset uint8": (dict(reset=lambda x: x.to(torch.uint8)), r"reset must be .*"),
    "state float16": (dict(state=lambda x: x.half()), r"state must be .*"),
    "init on meta": (dict(init=lambda x: x.to("meta")), r"init is on meta but state is on cpu"),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(BAD_RESET))
def test_memory_reset_rejects_bad_inputs(case, impl):
    over, pattern = BAD_RESET[case]
    args = dict(state=torch.randn(3, 4, 31), init=torch.randn(4, 31),
                reset=torch.tensor([True, False, True]))
    args.update({k: v(args[k]) for k, v in over.items()})
    with pytest.raises(RuntimeError, match=r"rmt_fast::memory_reset: " + pattern):
        FNS[impl][2](**args)


# --- registration, dispatch and import ------------------------------------------------------------

@requires_ext
def test_opcheck_cpu():
    from torch.library import opcheck
    args = make_embed_inputs(3, 13, 10, 31, table_dtype=torch.bfloat16, out_dtype=torch.bfloat16)
    args["ids"][:, 1:11] = 0  # opcheck reruns the op in ways that need no special ids
    opcheck(torch.ops.rmt_fast.segment_embed.default, tuple(args.values()))
    state, hidden, slots = torch.randn(4, 10, 31), torch.randn(3, 12, 31), torch.tensor([3, -1, 0])
    opcheck(torch.ops.rmt_fast.memory_write.default, (state, hidden, 2, slots))
    opcheck(torch.ops.rmt_fast.memory_reset.default,
            (state, torch.randn(10, 31), torch.tensor([True, False, False, True])))


@requires_ext
def test_ops_are_registered_once_with_the_documented_schemas():
    schemas = {name: str(getattr(torch.ops.rmt_fast, name).default._schema)
               for name in ("segment_embed", "memory_write", "memory_reset")}
    assert schemas == {
        "segment_embed": "rmt_fast::segment_embed(Tensor ids, Tensor memory, Tensor word_emb, "
                         "Tensor pos_emb, Tensor type_emb0, Tensor ln_weight, Tensor ln_bias, "
                         "float eps, Tensor(a!) out) -> ()",
        "memory_write": "rmt_fast::memory_write(Tensor(a!) state, Tensor hidden, int row_offset, "
                        "Tensor slots) -> ()",
        "memory_reset": "rmt_fast::memory_reset(Tensor(a!) state, Tensor init, Tensor reset) -> ()",
    }
    assert _ext.built_with_cuda() == bool(_ext._C.WITH_CUDA)
    if torch.version.cuda is None:
        assert not _ext.built_with_cuda()
        assert "without CUDA kernels" in _ext.why_unavailable("cuda")
    assert _ext.why_unavailable("cpu") is None


@requires_ext
def test_dispatch_prefers_the_op(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the torch twin ran although the extension is available")
    for name in ("segment_embed_torch", "memory_write_torch", "memory_reset_torch"):
        monkeypatch.setattr(_ext, name, refuse)
    args = make_embed_inputs(1, 7, 3, 31)
    _ext.segment_embed(**args)
    state = torch.zeros(2, 3, 31)
    _ext.memory_write(state, torch.ones(1, 4, 31), 1, torch.tensor([1]))
    _ext.memory_reset(state, torch.full((3, 31), 2.0), torch.tensor([True, False]))
    assert (state[0] == 2).all() and (state[1] == 1).all()


def _import_ext_without_C(verbose):
    code = ("import sys, warnings\n"
            "sys.modules['rmt_fast._C'] = None  # as if it were not built\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    from rmt_fast import _ext\n"
            "    import rmt_fast._ext\n"
            "import torch\n"
            "args = [torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 1, 4), torch.randn(5, 4),\n"
            "        torch.randn(3, 4), torch.zeros(4), torch.ones(4), torch.zeros(4), 1e-12,\n"
            "        torch.empty(1, 3, 4)]\n"
            "_ext.segment_embed(*args)\n"
            "assert not _ext.available() and not _ext.built_with_cuda()\n"
            "print('REASON', _ext.why_unavailable())\n"
            "print('WARNINGS', len(caught))\n"
            "print(caught[0].message)\n")
    env = {**os.environ, "RMT_FAST_EXT_VERBOSE": "1" if verbose else "0"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_import_without_the_extension_warns_once_and_falls_back():
    out = _import_ext_without_C(verbose=False)
    assert "REASON rmt_fast._C is not built" in out
    assert "WARNINGS 1" in out
    assert "Using the pure-torch paths instead. Set RMT_FAST_EXT_VERBOSE=1 for details." in out
    assert "Traceback" not in out
    assert "Traceback" in _import_ext_without_C(verbose=True)


# --- the CUDA sources against nvcc ----------------------------------------------------------------

NVCC = shutil.which("nvcc")
ARCHS = ("80", "90")  # A100 class and H100/H200; CUDA 13 dropped everything before sm_75


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
def test_cuda_sources_compile_with_nvcc(tmp_path):
    """Compile (not link) every .cu with nvcc against this torch's headers, for sm_80 and sm_90.

    The CPU wheel ships the c10/ATen CUDA headers but not the generated
    c10/cuda/impl/cuda_cmake_macros.h, whose only content, C10_CUDA_BUILD_SHARED_LIBS, matters on
    Windows alone; C10_CUDA_NO_CMAKE_CONFIGURE_FILE (torch's switch for builds without that file)
    skips it. Flags follow torch's BuildExtension: -std=c++20 and torch's COMMON_NVCC_FLAGS.
    """
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    assert sources, "no .cu sources found"
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{os.path.join(ROOT, 'csrc')}"]
    for source in sources:
        obj = tmp_path / (os.path.basename(source) + ".o")
        cmd = [NVCC, "-c", source, "-o", str(obj), "-std=c++20", "-O3", "-Xcompiler", "-fPIC",
               *(f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS), "--threads", "2",
               "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
               "-DRMT_FAST_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
               *COMMON_NVCC_FLAGS, *includes]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-6000:]}"
        own_warnings = [line for line in proc.stderr.splitlines()
                        if "warning" in line and re.search(r"csrc[/\\]", line)]
        assert not own_warnings, "\n".join(own_warnings)
        cuobjdump = shutil.which("cuobjdump") or os.path.join(os.path.dirname(NVCC), "cuobjdump")
        if os.path.exists(cuobjdump):
            listing = subprocess.run([cuobjdump, "--list-elf", str(obj)], capture_output=True,
                                     text=True, timeout=60).stdout
            assert all(f"sm_{a}" in listing for a in ARCHS), listing
