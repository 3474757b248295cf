"""The Engine on a CUDA GPU, on a bert-base-shaped model (head_dim 64: the Triton kernel's sizes, so the
shipped path runs: Triton attention inside captured CUDA graphs), against the CPU float32 oracle.

- float32 (SDPA, exact; graphs on and off): max abs logit difference to the oracle <= 1e-4.
- bfloat16, Triton attention with CUDA graphs, against the same model in bfloat16 with SDPA, eager:
  max abs logit difference <= BF16_BOUND (logits here have a std of about 1).
- VRAM flat from 16 to 4096 segments, batch 1 and 8, graphs on and off, by three measures (the
  allocator's peak, its reserve, which counts graph pools, and device-wide use).
Each test records what it measured (``record_property``), so the GPU check's results carry the numbers.
Without a GPU every test here skips.
"""
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from conftest import requires_cuda
from helpers import bert_base_cased_config, make_model, oracle, random_docs
from rmt_fast import Engine

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from gpu_steps import VramProbe, attention_used, backends_in  # noqa: E402

pytestmark = requires_cuda

# Full and partial segments (499 text tokens each), slots reused at batch 4, and a long document that
# runs alone at the end, so both graph variants (with and without the key mask) are captured and replayed.
LENGTHS = [1, 498, 499, 500, 1500, 2400, 499 * 8]
# bfloat16 rounds every activation to 8 mantissa bits; two attention backends differ in summation order
# and where P is rounded. On the CPU the same shape measured 0.016 against float32 (tests/test_engine.py).
BF16_BOUND = 0.05
MIB = 2**20


@pytest.fixture(scope="module")
def bert2():
    """2 layers of bert-base-cased's shape: hidden 768, 12 heads of 64, vocab 28996 + 10 memory rows."""
    torch.manual_seed(1234)
    return make_model(bert_base_cased_config(num_layers=2), num_mem_tokens=10, input_size=512)


@pytest.fixture(scope="module")
def docs(bert2):
    torch.manual_seed(4321)
    return random_docs(LENGTHS, bert2.config.vocab_size)


@pytest.fixture(scope="module")
def want(bert2, docs):
    return torch.stack([oracle(bert2, d) for d in docs])                    # CPU, float32


def _record(record_property, engine, **numbers):
    record_property("attention", json.dumps(attention_used(engine)))
    record_property("graphs", engine.graphs_status)
    for key, value in numbers.items():
        record_property(key, value)


def _assert_graphs_replayed(engine):
    status = engine.graphs_status
    assert status.startswith("on") and "captured: none" not in status, status
    assert re.search(r"\bmasked\b", status) and "unmasked" in status, status


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_float32_on_cuda_matches_the_cpu_oracle(bert2, docs, want, graphs, record_property):
    # The 1e-4 parity needs IEEE float32 products: TF32 matmuls (off by default) would cost ~1e-3.
    assert not torch.backends.cuda.matmul.allow_tf32 and torch.get_float32_matmul_precision() == "highest"
    engine = Engine(bert2, "cuda", torch.float32, cuda_graphs=graphs)
    got = engine.classify(docs, batch_size=4)
    diff = (got.double() - want).abs().max().item()
    _record(record_property, engine, max_abs_diff=diff)
    assert not torch.backends.cuda.matmul.allow_tf32, "the Engine switched TF32 on"
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert diff <= 1e-4, diff
    assert want.std(0).max() > 1e-2, "logits barely depend on the input: the comparison would be vacuous"
    assert backends_in(attention_used(engine)) == {"sdpa"}, attention_used(engine)   # exact and fastest
    if graphs:
        _assert_graphs_replayed(engine)
    else:
        assert engine.graphs_status.startswith("off"), engine.graphs_status


def test_bfloat16_triton_with_graphs_against_sdpa_eager(bert2, docs, want, record_property):
    reference = Engine(bert2, "cuda", torch.bfloat16, "sdpa", cuda_graphs=False)
    ref = reference.classify(docs, batch_size=4)
    engine = Engine(bert2, "cuda", torch.bfloat16, cuda_graphs=True)      # auto: Triton on sm_80+
    got = engine.classify(docs, batch_size=4)
    diff = (got - ref).abs().max().item()
    to_oracle = (got.double() - want).abs().max().item()
    _record(record_property, engine, max_abs_diff_to_sdpa_eager=diff, max_abs_diff_to_float32_oracle=to_oracle,
            sdpa_eager_diff_to_float32_oracle=(ref.double() - want).abs().max().item())
    assert torch.cuda.get_device_capability() < (8, 0) or backends_in(attention_used(engine)) == {"triton"}, \
        attention_used(engine)
    assert backends_in(attention_used(reference)) == {"sdpa"}
    _assert_graphs_replayed(engine)
    assert torch.isfinite(got).all()
    assert diff <= BF16_BOUND, diff
    assert to_oracle <= BF16_BOUND, to_oracle


def test_explicit_triton_on_cuda_runs_the_kernel(bert2, docs, want, record_property):
    """attention='triton' on CUDA tensors: the compiled kernel inside the Engine, not a fallback."""
    engine = Engine(bert2, "cuda", torch.bfloat16, "triton", cuda_graphs=False)
    got = engine.classify(docs[:4], batch_size=4)
    diff = (got.double() - want[:4]).abs().max().item()
    _record(record_property, engine, max_abs_diff_to_float32_oracle=diff)
    assert backends_in(attention_used(engine)) == {"triton"}
    assert diff <= BF16_BOUND, diff


@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
@pytest.mark.parametrize("batch_size", [1, 8])
def test_vram_flat_from_16_to_4096_segments(bert2, batch_size, graphs, record_property):
    engine = Engine(bert2, "cuda", torch.bfloat16, cuda_graphs=graphs)
    S, V = bert2.config.segment_size, bert2.config.vocab_size
    engine.classify([torch.randint(1000, V, (2 * S,)) for _ in range(batch_size)], batch_size=batch_size)  # capture
    peaks = {}
    for n in (16, 4096):
        docs = [torch.randint(1000, V, (n * S,)) for _ in range(batch_size)]
        with VramProbe("cuda") as probe:
            engine.classify(docs, batch_size=batch_size)
        peaks[n] = probe.peak
        del docs
    growth = {k: peaks[4096][k] - peaks[16][k] for k in peaks[16]}
    _record(record_property, engine, **{f"growth_{k}": v for k, v in growth.items()},
            **{f"peak16_{k}": v for k, v in peaks[16].items()})
    assert set(growth) == {"allocated", "reserved", "device"}
    assert all(v <= MIB for v in growth.values()), {k: v / MIB for k, v in growth.items()}
    if graphs:
        assert engine.graphs_status.startswith("on") and "captured: none" not in engine.graphs_status
