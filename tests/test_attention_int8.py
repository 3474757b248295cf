"""attention_int8 (csrc/cpu/attention_int8.cpp): attention with int8 q, k, v and uint8 probabilities on
oneDNN's u8 x s8 micro-kernel. The compiled kernel against its torch twin (the same arithmetic, up to
the exp2 approximation flipping a probability's rounding) and both against a float64 oracle of
exact attention within the quantization error; key lengths, several key blocks, odd sizes."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rmt_fast import _ext
from rmt_fast.engine import quant

VNNI = quant.vnni_problem()
compiled = pytest.mark.skipif(VNNI is not None, reason=f"attention_int8 cannot run here: {VNNI}")
SHAPES = [  # B, Tq, Tk, heads, D, key_lengths
    (2, 7, 9, 3, 5, None),
    (1, 70, 600, 2, 33, [555]),           # two key blocks (512 + 43), odd D
    (2, 65, 512, 4, 64, [512, 300]),
    (1, 11, 1100, 2, 32, None),           # three key blocks
    (3, 5, 20, 1, 16, [0, 1, 20]),        # no key (zeros), one key
]


def inputs(B, Tq, Tk, H, D, lengths, dtype=torch.float32):
    """q, k with a spread of scores; v with columns of magnitudes 1e-2 .. 1e2 (a per-tensor scale would
    lose the small ones)."""
    q, k = torch.randn(B, Tq, H, D) * 2, torch.randn(B, Tk, H, D)
    v = torch.randn(B, Tk, H, D) * torch.logspace(-2, 2, D)
    kl = None if lengths is None else torch.tensor(lengths)
    return q.to(dtype), k.to(dtype), v.to(dtype), kl


def oracle(q, k, v, kl, scale):
    """Exact attention in float64: [B, Tq, heads * D]."""
    B, Tq, H, D = q.shape
    s = torch.einsum("bthd,bjhd->bhtj", q.double(), k.double()) * scale
    if kl is not None:
        s = s.masked_fill(torch.arange(k.shape[1])[None, None, None, :] >= kl[:, None, None, None], float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("bhtj,bjhd->bthd", p, v.double()).reshape(B, Tq, H * D)


def column_bound(v, kl, H, D, rel):
    """rel * max |v| of each (batch, head, column) over the batch's keys: [B, 1, H * D]."""
    vv = v.double().abs()
    if kl is not None:
        vv = vv * (torch.arange(v.shape[1])[None, :, None, None] < kl[:, None, None, None])
    return rel * vv.amax(1).reshape(v.shape[0], 1, H * D)


@pytest.mark.parametrize("impl", [pytest.param("compiled", marks=compiled), "twin"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_within_the_quantization_error_of_exact_attention(impl, shape):
    B, Tq, Tk, H, D, lengths = shape
    q, k, v, kl = inputs(*shape)
    scale = 1 / math.sqrt(D)
    op = _ext.attention_int8 if impl == "compiled" else _ext.attention_int8_torch
    got = op(q, k, v, kl, scale)
    assert got.shape == (B, Tq, H * D) and got.dtype == q.dtype
    err = (got.double() - oracle(q, k, v, kl, scale)).abs()
    # per value column: int8 scores and 8-bit v and probabilities stay within 8% of the column's
    # largest |v| on these inputs (measured: at most 5.6% over 6 seeds, sharp rows with q * 2)
    assert (err <= column_bound(v, kl, H, D, 0.08)).all(), (err / column_bound(v, kl, H, D, 1)).max()
    if lengths is not None and 0 in lengths:
        assert torch.equal(got[lengths.index(0)], torch.zeros(Tq, H * D))


@compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_matches_its_twin(dtype, shape):
    B, Tq, Tk, H, D, lengths = shape
    q, k, v, kl = inputs(*shape, dtype=dtype)
    got = _ext.attention_int8(q, k, v, kl, 0.3).double()
    want = _ext.attention_int8_torch(q, k, v, kl, 0.3).double()
    # the same integers but where the kernel's exp2 polynomial rounds a probability to the next of
    # its 255 steps; and the output's own rounding (bfloat16)
    tol = column_bound(v, kl, H, D, 2e-3) + (want.abs() * 2 ** -8 if dtype == torch.bfloat16 else 0)
    assert ((got - want).abs() <= tol).all()


@compiled
def test_strided_heads_and_thread_count():
    """q, k, v as views of one [B, T, 3, heads, D] projection (as the plan passes them), at 1 and 2
    threads: one result."""
    qkv = torch.randn(2, 130, 3, 4, 24).to(torch.bfloat16)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    threads, results = torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(_ext.attention_int8(q, k, v, torch.tensor([130, 77]), 0.2))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(*results)
    assert torch.equal(results[0], _ext.attention_int8(q.contiguous(), k.contiguous(), v.contiguous(),
                                                       torch.tensor([130, 77]), 0.2))


@pytest.mark.parametrize("impl", [pytest.param("compiled", marks=compiled), "twin"])
def test_bad_inputs_raise_naming_the_argument(impl):
    op = _ext.attention_int8 if impl == "compiled" else _ext.attention_int8_torch
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="attention_int8: key_lengths\\[0\\] = -1 is negative"):
        op(q, q, q, torch.tensor([-1]), 1.0)
    with pytest.raises(RuntimeError, match="attention_int8"):
        op(q, q.double(), q, None, 1.0)


@compiled
def test_engine_runs_int8_attention_where_switched_on(monkeypatch):
    """quantize="int8" with INT8_ATTENTION: every layer but the last runs attention_int8 (the report says
    so); off (the default), none does. Labels agree with float32 on a short document either way."""
    from helpers import bert_base_cased_config, make_model

    from rmt_fast import Engine
    model = make_model(bert_base_cased_config(num_layers=3, hidden_size=64, num_attention_heads=4,
                                              intermediate_size=160), num_mem_tokens=4, input_size=40)
    docs = [torch.randint(1000, 20000, (n,)) for n in (130, 47)]
    want = Engine(model, dtype="float32").classify(docs)
    for on in (False, True):
        monkeypatch.setattr(quant, "INT8_ATTENTION", on)
        e = Engine(model, dtype="bfloat16", quantize="int8")
        got = e.classify(docs)
        ran = [sorted(set(layer.values())) for layer in e.plan.attention_report]
        assert ran[:-1] == ([["cpp_int8"]] * 2 if on else [["cpp"]] * 2) and ran[-1] == ["cpp"]
        assert torch.equal(got.argmax(1), want.argmax(1)) and (got - want).abs().max() < 0.2


def test_scalar_code_in_a_subprocess():
    """This file's and test_int8_vnni.py's cases with ATEN_CPU_CAPABILITY=avx2 (as on a CPU without
    AVX-512): the kernels' scalar row passes, quantize and dequantize."""
    if VNNI is not None:
        pytest.skip(VNNI)
    if os.environ.get("ATEN_CPU_CAPABILITY") == "avx2":
        assert torch.backends.cpu.get_cpu_capability() == "AVX2"
        return
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", __file__,
                          str(Path(__file__).with_name("test_int8_vnni.py"))],
                         cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failed" not in run.stdout
