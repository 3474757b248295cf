"""The ops torch.ops.rmt_fast.segment_embed / memory_write, by their compiled kernels (rmt_fast._C) and
by their pure-torch twins, against an obviously-right float64 loop; their registration (schemas
defined once in rmt_fast/_ext.py, the twins registered where rmt_fast._C is missing), and the C++/CUDA
sources compiled as C++17. Tests of the compiled kernels skip, with the reason, when they are not
built; the twins are tested either way."""
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
# Every behavioural test runs on both implementations: "op" is the one op callers call (the compiled
# kernel where built: those cases skip without it), "torch" the twin called directly.
IMPLS = [pytest.param("op", marks=requires_ext), "torch"]
FNS = {
    "op": (_ext.segment_embed, _ext.memory_write),
    "torch": (_ext.segment_embed_torch, _ext.memory_write_torch),
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
    torch.testing.assert_close(_ext.segment_embed(**args), twin, **TOL[out_dtype])


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
                 r"hidden must have shape \(B, R, H\).*got \[3, 11, 30\]"),
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


# --- low precision: the float32 embedding, rounded once ----------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_output_is_the_float32_output_rounded_once(device, out_dtype, impl):
    """Issue 19, 2.2: a sum rounded to 16 bits before the LayerNorm (or any other extra rounding)
    changes some elements by an ulp, which the float64 tolerance above absorbs; bit equality does not."""
    _device_or_skip(device)
    args = make_embed_inputs(3, 13, 5, 384, out_dtype=torch.float32, device=device)
    want = FNS[impl][0](**args).to(out_dtype)
    low = {**args, "out": torch.full_like(args["out"], float("nan"), dtype=out_dtype)}
    assert torch.equal(FNS[impl][0](**low), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_plan_embeds_from_float32_tables(dtype):
    """The plan keeps the embedding tables in float32 whatever its dtype, so its low-precision
    embedding is its float32 embedding rounded once (a plan holding the tables in bf16 fails)."""
    from helpers import tiny_model
    from rmt_fast import Engine

    model = tiny_model(num_mem_tokens=5, input_size=40)
    low, full = Engine(model, dtype=dtype).plan, Engine(model, dtype=torch.float32).plan
    for name in ("word_emb", "pos_emb", "type_emb0", "emb_ln_w", "emb_ln_b", "initial_memory"):
        assert getattr(low, name).dtype == torch.float32, name
    ids = torch.randint(3, model.config.vocab_size, (4, 40))
    memory = torch.randn(4, 5, model.model.config.hidden_size)
    assert torch.equal(low.embed(ids, memory), full.embed(ids, memory).to(dtype))


# --- registration, dispatch and import ------------------------------------------------------------

OPS = ("segment_embed", "memory_write", "attention")


def opcheck_every_op():
    """torch.library.opcheck on each op (schema, fake tensor, AOT dispatch), whichever kernels back it."""
    from torch.library import opcheck
    args = make_embed_inputs(3, 13, 10, 31, table_dtype=torch.bfloat16, out_dtype=torch.bfloat16)
    args["ids"][:, 1:11] = 0  # opcheck reruns the op in ways that need no special ids
    opcheck(torch.ops.rmt_fast.segment_embed.default, tuple(args.values()))
    state, hidden, slots = torch.randn(4, 10, 31), torch.randn(3, 12, 31), torch.tensor([3, -1, 0])
    opcheck(torch.ops.rmt_fast.memory_write.default, (state, hidden, 2, slots))
    q, k = torch.randn(2, 5, 2, 32), torch.randn(2, 9, 2, 32)
    for key_lengths in (None, torch.tensor([9, 0])):
        opcheck(torch.ops.rmt_fast.attention.default, (q, k, k.clone(), key_lengths, 0.3))


@requires_ext
def test_opcheck_compiled_kernels():
    opcheck_every_op()


def test_schemas_are_defined_once_in_python():
    assert set(_ext.SCHEMAS) == set(OPS)
    for name, schema in _ext.SCHEMAS.items():
        assert str(getattr(torch.ops.rmt_fast, name).default._schema) == "rmt_fast::" + schema
    assert _ext.SCHEMAS["segment_embed"].endswith("float eps, Tensor(a!) out) -> ()")
    assert _ext.SCHEMAS["memory_write"] == ("memory_write(Tensor(a!) state, Tensor hidden, int row_offset, "
                                            "Tensor slots) -> ()")
    sources = "".join(open(f).read() for f in glob.glob(os.path.join(ROOT, "csrc", "**", "*.*"), recursive=True))
    assert "TORCH_LIBRARY(" not in sources and "m.def(" not in sources  # C++ registers kernels only


@requires_ext
def test_compiled_kernels_back_the_ops():
    for name in OPS:
        dump = torch._C._dispatch_dump(f"rmt_fast::{name}")
        cpu = next(line for line in dump.splitlines() if line.startswith("CPU:"))
        meta = next(line for line in dump.splitlines() if line.startswith("Meta:"))
        assert "csrc" in cpu and "csrc" in meta, dump
    assert _ext.built_with_cuda() == bool(_ext._C.WITH_CUDA)
    if torch.version.cuda is None:
        assert not _ext.built_with_cuda()
        assert "without CUDA kernels" in _ext.why_unavailable("cuda")
    assert _ext.why_unavailable("cpu") is None


WITHOUT_C = r"""
import sys, warnings
sys.path.insert(0, {tests!r})
sys.modules['rmt_fast._C'] = None  # as if it were not built
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    from rmt_fast import _ext
    import rmt_fast._ext
import pytest, torch
from test_extension import BAD_EMBED, make_embed_inputs, opcheck_every_op, _embed_case
assert not _ext.available() and not _ext.built_with_cuda()
assert _ext.attention_why_unavailable() == _ext.why_unavailable()
dump = torch._C._dispatch_dump('rmt_fast::segment_embed')
assert 'CPU: registered at' in dump and 'csrc' not in dump, dump
args = make_embed_inputs(2, 7, 3, 31)
want = _ext.segment_embed_torch(**{{**args, 'out': args['out'].clone()}})
assert torch.equal(_ext.segment_embed(**args), want)
with pytest.raises(RuntimeError, match=r'rmt_fast::segment_embed: memory must have shape'):
    _ext.segment_embed(**_embed_case(BAD_EMBED['memory batch'][0])())
opcheck_every_op()
print('REASON', _ext.why_unavailable())
print('WARNINGS', len(caught))
print(caught[0].message)
"""


def _import_ext_without_C(verbose):
    code = WITHOUT_C.format(tests=os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "RMT_FAST_EXT_VERBOSE": "1" if verbose else "0"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_without_the_extension_the_twins_are_the_ops():
    """No rmt_fast._C: one warning, and the twins registered as the ops (checked, opcheck-clean)."""
    out = _import_ext_without_C(verbose=False)
    assert "REASON rmt_fast._C is not built" in out
    assert "WARNINGS 1" in out
    assert "Using the pure-torch paths instead. Set RMT_FAST_EXT_VERBOSE=1 for details." in out
    assert "Traceback" not in out
    assert "Traceback" in _import_ext_without_C(verbose=True)


# --- the C++/CUDA sources as C++17 (torch 2.11's standard) ----------------------------------------

NVCC = shutil.which("nvcc")
GXX = shutil.which("g++")
ARCHS = ("80", "90")  # A100 class and H100/H200; CUDA 13 dropped everything before sm_75
SHARED_MEMORY_BYTES = 48 * 1024  # per block, without opt-in


def _own_warnings(stderr):
    return [line for line in stderr.splitlines() if "warning" in line and re.search(r"csrc[/\\]", line)]


@pytest.mark.skipif(GXX is None, reason="g++ is not on PATH")
def test_cpp_sources_compile_as_cpp17():
    """Every .cpp (and the headers it includes) parses and type-checks as C++17 with no warning of ours."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"), recursive=True))
    assert len(sources) >= 3
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    for source in sources:
        cmd = [GXX, "-std=c++17", "-fsyntax-only", "-Wall", "-Wno-unknown-pragmas",
               "-Wno-missing-field-initializers", "-DTORCH_API_INCLUDE_EXTENSION_H", *includes, source]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-6000:]}"
        assert not _own_warnings(proc.stderr), "\n".join(_own_warnings(proc.stderr))


def test_cuda_hidden_size_limit_fits_the_shared_memory():
    """One float32 row of H plus the 32-float reduction scratch in 48 KiB: H <= 12256, not 12288."""
    assert (SHARED_MEMORY_BYTES - 32 * 4) // 4 == 12256
    if _ext.available():
        assert _ext._C.MAX_HIDDEN_CUDA == 12256


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
def test_cuda_sources_compile_with_nvcc(tmp_path):
    """Compile (not link) every .cu with nvcc as C++17 against this torch's headers, for sm_80 and sm_90.

    The CPU wheel ships the c10/ATen CUDA headers but not the generated
    c10/cuda/impl/cuda_cmake_macros.h, whose only content, C10_CUDA_BUILD_SHARED_LIBS, matters on
    Windows alone; C10_CUDA_NO_CMAKE_CONFIGURE_FILE (torch's switch for builds without that file)
    skips it. Flags follow torch's BuildExtension, with -std=c++17 (torch 2.11's standard) and
    torch's COMMON_NVCC_FLAGS. ptxas reports each kernel's static shared memory: segment_embed's
    must leave exactly room for MAX_HIDDEN_CUDA floats of dynamic shared memory in 48 KiB.
    """
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    assert sources, "no .cu sources found"
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{os.path.join(ROOT, 'csrc')}"]
    for source in sources:
        obj = tmp_path / (os.path.basename(source) + ".o")
        cmd = [NVCC, "-c", source, "-o", str(obj), "-std=c++17", "-O3", "-Xcompiler", "-fPIC",
               "-Xptxas", "-v",
               *(f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS), "--threads", "2",
               "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
               "-DRMT_FAST_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
               *COMMON_NVCC_FLAGS, *includes]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-6000:]}"
        assert not _own_warnings(proc.stderr), "\n".join(_own_warnings(proc.stderr))
        cuobjdump = shutil.which("cuobjdump") or os.path.join(os.path.dirname(NVCC), "cuobjdump")
        if os.path.exists(cuobjdump):
            listing = subprocess.run([cuobjdump, "--list-elf", str(obj)], capture_output=True,
                                     text=True, timeout=60).stdout
            assert all(f"sm_{a}" in listing for a in ARCHS), listing
        if source.endswith("kernels.cu"):
            smem = [int(m) for m in re.findall(
                r"Compiling entry function '\w*segment_embed_kernel\w*'.*?\n.*?(\d+) bytes smem",
                proc.stderr, flags=re.S)]
            assert smem, proc.stderr[-4000:]
            for static in smem:
                assert static + 12256 * 4 <= SHARED_MEMORY_BYTES < static + 12257 * 4, static


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_hidden_size_limit():
    _device_or_skip("cuda")
    limit = _ext._C.MAX_HIDDEN_CUDA
    args = make_embed_inputs(1, 3, 1, limit, device="cuda")
    torch.testing.assert_close(_ext.segment_embed(**args).double(), segment_embed_reference(**args),
                               **TOL[torch.float32])
    args = make_embed_inputs(1, 3, 1, limit + 1, device="cuda")
    with pytest.raises(RuntimeError, match=f"hidden size H = {limit + 1} exceeds the CUDA kernel's limit"):
        _ext.segment_embed(**args)


def test_a_stale_build_that_defines_the_schemas_still_imports():
    """A _C built before the schemas moved to Python defines them itself (TORCH_LIBRARY): importing
    warns to rebuild instead of failing (simulated by defining the ops before rmt_fast is imported)."""
    code = ("import warnings, torch\n"
            "old = torch.library.Library('rmt_fast', 'DEF')\n"
            "old.define('memory_write(Tensor(a!) state, Tensor hidden, int row_offset, Tensor slots) -> ()')\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    from rmt_fast import _ext\n"
            "print([str(w.message) for w in caught])\n"
            "state = torch.zeros(2, 3, 4)\n"
            "_ext.memory_write(state, torch.ones(1, 3, 4), 0, torch.tensor([1]))\n"
            "assert state[1].eq(1).all() and state[0].eq(0).all()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "built from older sources: it defines memory_write itself; rebuild it" in proc.stdout
