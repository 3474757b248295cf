"""The training flags tried for Reasoning (issue 15): --position-init sinusoidal, --position-scale, --init-range."""
import argparse
from pathlib import Path

import pytest
import torch

from rmt_fast.backbones import build_model, sinusoidal_positions
from rmt_fast.model import RMTForSequenceClassification
from rmt_fast.train import TrainConfig, add_cli, train

BERT_CASED = str(Path(__file__).resolve().parents[1] / "rmt_fast" / "data" / "bert-base-cased")


def _tiny(out_dir, **kw) -> TrainConfig:
    base = dict(out_dir=str(out_dir), task=("reasoning",), backbone=BERT_CASED, random_init=True, num_layers=1,
                hidden_size=32, num_heads=2, intermediate_size=64, input_size=40, num_mem_tokens=2,
                min_segments=1, max_segments=1, stage_steps=1, eval_every=1, val_samples=4, batch_size=4,
                progress=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("hidden", [32, 46])
def test_sinusoidal_rows_shift_by_a_fixed_rotation(hidden):
    """Row p + k is row p turned by angle k * w_i in each (sin, cos) pair: what makes 'k tokens back' linear."""
    scale = 0.03
    table = sinusoidal_positions(70, hidden, scale).double()              # [70, hidden]
    assert table.shape == (70, hidden) and table.dtype == torch.float64
    freq = 10000.0 ** (-torch.arange(0, hidden, 2, dtype=torch.float64) / hidden)
    torch.testing.assert_close(table[0, 1::2], torch.full((hidden // 2,), scale, dtype=torch.float64))
    for k in (1, 2, 5):
        c, s = torch.cos(k * freq), torch.sin(k * freq)
        sin_p, cos_p = table[:-k, 0::2], table[:-k, 1::2]
        torch.testing.assert_close(table[k:, 0::2], sin_p * c + cos_p * s, atol=1e-6, rtol=0)
        torch.testing.assert_close(table[k:, 1::2], cos_p * c - sin_p * s, atol=1e-6, rtol=0)
    # Every row has the same norm: position is direction, not size.
    norms = table.norm(dim=1)
    assert norms.max() - norms.min() < 0.02 * norms.mean()


@pytest.mark.parametrize("scale, expected_scale", [(None, 0.02 * 2 ** 0.5), (0.07, 0.07)])
def test_training_starts_from_sinusoidal_positions(tmp_path, scale, expected_scale):
    torch.manual_seed(0)
    final = train(_tiny(tmp_path / "run", position_init="sinusoidal", position_scale=scale, lr=1e-9,
                        warmup_steps=0))
    model = RMTForSequenceClassification.from_pretrained(final)
    pos = model.bert.embeddings.position_embeddings.weight.detach()     # [P, H]
    expected = sinusoidal_positions(*pos.shape, scale=expected_scale)
    torch.testing.assert_close(pos, expected, atol=1e-6, rtol=0)


def test_init_range_sets_the_spread_of_random_weights():
    spreads = {}
    for r in (None, 0.1):
        torch.manual_seed(0)
        model, _ = build_model(_tiny("unused", init_range=r))
        spreads[r] = (model.bert.encoder.layer[0].attention.self.query.weight.std().item(),
                      model.bert.embeddings.word_embeddings.weight.std().item())
    assert all(abs(s - 0.02) < 0.003 for s in spreads[None]), spreads
    assert all(abs(s - 0.1) < 0.015 for s in spreads[0.1]), spreads


@pytest.mark.parametrize("extra, message", [
    (["--init-range", "0.05"], "--init-range needs --random-init"),
    (["--position-init", "sinusoidal"], "--position-init sinusoidal needs --random-init"),
    (["--random-init", "--position-scale", "0.1"], "--position-scale needs --position-init sinusoidal"),
])
def test_flags_without_random_init_are_refused_by_name(tmp_path, extra, message):
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    args = parser.parse_args(["train", str(tmp_path / "run"), "--backbone", BERT_CASED] + extra)
    kwargs = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)
