"""torch.ops.rmt_fast.segment_embed, by its compiled kernel (rmt_fast._C) and its pure-torch twin,
against an obviously-right float64 loop: shapes, low-precision tables and outputs (the float32
embedding rounded once), strides, batch invariance and refusals."""
import pytest
import torch

from rmt_fast import _ext

from extension_cases import DEVICES, EPS, FNS, IMPLS, TOL, device_or_skip, requires_ext


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
    device_or_skip(device)
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
    device_or_skip(device)
    args = make_embed_inputs(3, 13, 10, H, table_dtype=table_dtype, out_dtype=out_dtype, device=device)
    expected = segment_embed_reference(**args)
    torch.testing.assert_close(FNS[impl][0](**args).double(), expected, **TOL[out_dtype])


@requires_ext
@pytest.mark.parametrize("out_dtype", list(TOL), ids=str)
@pytest.mark.parametrize("T,M", [(1, 10), (7, 3), (13, 10)])
@pytest.mark.parametrize("device", DEVICES)
def test_segment_embed_op_matches_torch_twin(device, T, M, out_dtype):
    device_or_skip(device)
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


# --- low precision: the float32 embedding, rounded once ----------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_output_is_the_float32_output_rounded_once(device, out_dtype, impl):
    """Issue 19, 2.2: a sum rounded to 16 bits before the LayerNorm (or any other extra rounding)
    changes some elements by an ulp, which the float64 tolerance above absorbs; bit equality does not."""
    device_or_skip(device)
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_hidden_size_limit():
    device_or_skip("cuda")
    limit = _ext._C.MAX_HIDDEN_CUDA
    args = make_embed_inputs(1, 3, 1, limit, device="cuda")
    torch.testing.assert_close(_ext.segment_embed(**args).double(), segment_embed_reference(**args),
                               **TOL[torch.float32])
    args = make_embed_inputs(1, 3, 1, limit + 1, device="cuda")
    with pytest.raises(RuntimeError, match=f"hidden size H = {limit + 1} exceeds the CUDA kernel's limit"):
        _ext.segment_embed(**args)
