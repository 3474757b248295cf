"""4096 segments: the same answer as the oracle's recurrence, in memory that does not grow with length."""
import pytest
import torch
from transformers import BertConfig

from conftest import requires_cuda
from helpers import make_model, oracle
from rmt_fast import Engine
from rmt_fast.bench import PeakMemory


def _model():
    bc = BertConfig(vocab_size=60, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128, max_position_embeddings=64, initializer_range=0.2)
    return make_model(bc, num_mem_tokens=3, input_size=24, cls_token_id=1, sep_token_id=2, pad_token_id=0)


def _doc(model, n_segments, extra=0):
    return torch.randint(3, 60, (n_segments * model.config.segment_size + extra,))


def test_4096_segments_in_flat_memory():
    model = _model()
    engine = Engine(model)
    engine.classify([_doc(model, 2)])  # warm-up: first-call allocations are not growth
    short, long = _doc(model, 64), _doc(model, 4096, extra=5)
    with PeakMemory("cpu") as m64:
        engine.classify([short])
    with PeakMemory("cpu") as m4096:
        got = engine.classify([long])[0]
    # Keeping one [24, 64] float32 hidden state per segment and layer would add 4096 * 2 * 6 KiB = 48 MiB.
    ids_bytes = long.numel() * 8
    assert m4096.peak <= m64.peak + 4 * ids_bytes + 4 * 2**20, (m64.peak, m4096.peak)
    assert torch.isfinite(got).all()
    # The recurrence itself is checked against the oracle at 300 segments (the oracle is slow).
    mid = _doc(model, 300, extra=7)
    assert (engine.classify([mid])[0].double() - oracle(model, mid)).abs().max() <= 1e-4


@requires_cuda
@pytest.mark.parametrize("batch_size", [1, 4])
def test_cuda_peak_memory_flat(batch_size):
    model = _model()
    engine = Engine(model, device="cuda")
    engine.classify([_doc(model, 2)] * batch_size, batch_size=batch_size)
    peaks = {}
    for n in (16, 4096):
        docs = [_doc(model, n) for _ in range(batch_size)]
        with PeakMemory("cuda") as m:
            engine.classify(docs, batch_size=batch_size)
        peaks[n] = m.peak
    assert peaks[4096] - peaks[16] <= 2**20, peaks
