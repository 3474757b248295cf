"""The plan's linear layers (oneDNN pre-packed weights, fused activation) against float64 F.linear."""
import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from helpers import bert_base_cased_config, make_model, oracle, random_docs
from rmt_fast import Engine
from rmt_fast.engine.linear import FUSED_ACTIVATIONS, Linear, packing_available

PACK_REASON = {dt: packing_available(torch.device("cpu"), dt) for dt in (torch.float32, torch.bfloat16)}
requires_packing = pytest.mark.skipif(PACK_REASON[torch.float32] is not None,
                                      reason=f"no packed linear: {PACK_REASON[torch.float32]}")
# float32: rounding over K products; bfloat16: one output rounding (8 bits) plus the input's.
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def reference(x, w, b, act):
    y = F.linear(x.double(), w.double(), b.double())
    return y if act is None else ACT2FN[act](y)


@requires_packing
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", [None, *FUSED_ACTIVATIONS, "silu"])  # silu: not fused, applied after
@pytest.mark.parametrize("shape", [(1, 1, 768), (2, 7, 33), (3, 513, 64)])
def test_packed_linear_matches_float64(dtype, act, shape):
    if PACK_REASON[dtype] is not None:
        pytest.skip(PACK_REASON[dtype])
    K, N = shape[-1], 3 * shape[-1] + 5                          # odd output width
    x = torch.randn(shape).to(dtype)
    w = (torch.randn(N, K) / K ** 0.5).to(dtype)
    b = torch.randn(N).to(dtype)
    lin = Linear(w, b, act=act, pack=True)
    assert lin.packed
    y = lin(x)
    assert y.dtype == dtype and y.shape == (*shape[:-1], N)
    want = reference(x, w, b, act)
    assert (y.double() - want).abs().max() <= TOL[dtype] * (1 + want.abs().max())


@requires_packing
def test_packed_linear_takes_strided_input():
    """The last layer's query rows are a slice x[:, :rows], not contiguous for several documents."""
    x = torch.randn(4, 30, 48)
    w, b = torch.randn(20, 48), torch.randn(20)
    got = Linear(w, b, pack=True)(x[:, :11])
    assert (got.double() - reference(x[:, :11], w, b, None)).abs().max() <= 1e-4


def test_unpacked_linear_applies_activation():
    x, w, b = torch.randn(2, 5, 16), torch.randn(9, 16), torch.randn(9)
    got = Linear(w, b, act="gelu", pack=False)(x)
    assert (got.double() - reference(x, w, b, "gelu")).abs().max() <= 1e-5


def test_packing_reasons():
    assert "CPU" in packing_available(torch.device("cuda"), torch.float32)
    assert "float16" in packing_available(torch.device("cpu"), torch.float16)


def test_packed_weights_true_where_impossible_is_an_error():
    model = make_model(bert_base_cased_config(num_layers=1, hidden_size=64, num_attention_heads=4,
                                              intermediate_size=128), num_mem_tokens=2, input_size=32)
    with pytest.raises(ValueError, match="packed_weights=True is not possible here: only float32/bfloat16"):
        Engine(model, dtype=torch.float16, packed_weights=True)


@pytest.mark.parametrize("packed", [True, False])
def test_engine_both_weight_layouts_match_oracle(packed):
    if packed and PACK_REASON[torch.float32] is not None:
        pytest.skip(PACK_REASON[torch.float32])
    torch.manual_seed(7)
    model = make_model(bert_base_cased_config(num_layers=3, hidden_size=96, num_attention_heads=6,
                                              intermediate_size=200), num_mem_tokens=4, input_size=40)
    docs = random_docs([1, 33, 34, 35, 101], model.config.vocab_size)
    engine = Engine(model, packed_weights=packed)
    assert engine.plan.packed_weights is packed
    assert engine.plan.packed_weights_status.startswith("on" if packed else "off")
    want = torch.stack([oracle(model, d) for d in docs])
    got = engine.classify(docs, batch_size=3)
    assert (got.double() - want).abs().max() <= 1e-4
    assert want.std(0).max() > 1e-2
