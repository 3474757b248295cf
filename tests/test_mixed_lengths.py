"""--mixed-lengths: a stage of n segments trains on samples of min_segments..n segments, each count fixed by
the sample's index; without it every sample has n. Validation stays at n."""
from collections import Counter
from pathlib import Path

import pytest
import torch

from rmt_fast import tasks as T
from rmt_fast.config import RMTConfig
from rmt_fast.train import TrainConfig, read_metrics, sample_lengths, train

BERT_CASED = str(Path(__file__).resolve().parents[1] / "rmt_fast" / "data" / "bert-base-cased")


def _cfg(tmp_path, **kw):
    base = dict(out_dir=str(tmp_path / "run"), backbone=BERT_CASED, random_init=True, num_layers=1, hidden_size=32,
                num_heads=2, intermediate_size=64, input_size=40, num_mem_tokens=2, min_segments=1,
                max_segments=3, stage_steps=3, eval_every=3, val_samples=4, batch_size=8, threshold=1.0,
                progress=False, task=("memorize",))
    base.update(kw)
    return TrainConfig(**base)


def test_without_the_flag_every_sample_has_the_stage_length(tmp_path):
    assert sample_lengths(_cfg(tmp_path), 3, range(50)) == [3] * 50


def test_mixed_lengths_are_uniform_in_the_range_and_fixed_by_index(tmp_path):
    cfg = _cfg(tmp_path, mixed_lengths=True, min_segments=2, max_segments=5)
    got = sample_lengths(cfg, 4, range(3000))
    counts = Counter(got)
    assert set(counts) == {2, 3, 4}                                 # min_segments..stage, never below or above
    assert all(900 <= c <= 1100 for c in counts.values()), counts   # uniform: 1000 each, +-3 sigma ~ 78
    # The count of sample i does not depend on which other samples share its batch (or its rank).
    assert sample_lengths(cfg, 4, [7, 2999, 12]) == [got[7], got[2999], got[12]]
    assert sample_lengths(_cfg(tmp_path, mixed_lengths=True, min_segments=2, max_segments=5, seed=1),
                          4, range(3000)) != got
    assert sample_lengths(cfg, 2, range(10)) == [2] * 10            # the first stage has one length


def test_batch_takes_a_length_per_sample():
    tok = T.load_tokenizer(BERT_CASED)
    config = T.task_config(RMTConfig(vocab_size=len(tok), input_size=40))
    gen = T.TaskGenerator(("memorize", "reasoning"), tok, config, split="train", seed=3)
    docs, labels = gen.batch([1, 3, 2], [5, 6, 7])
    for doc, label, n, i in zip(docs, labels, [1, 3, 2], [5, 6, 7]):
        s = gen.sample(n, i)
        assert torch.equal(doc, s.input_ids) and int(label) == s.label
        assert len(doc) == n * config.segment_size
    with pytest.raises(ValueError, match="2 segment counts for 3 samples"):
        gen.batch([1, 2], [5, 6, 7])


def test_training_feeds_the_mixed_lengths_and_validates_at_the_stage(tmp_path, monkeypatch):
    import rmt_fast.train as train_module

    seen = []                                           # (stage, token lengths of one training batch)
    original = T.TaskGenerator.batch

    def spy(self, n_segments, indices):
        docs, labels = original(self, n_segments, indices)
        if self.split == "train":
            seen.append(sorted({len(d) // self.config.segment_size for d in docs}))
        return docs, labels

    monkeypatch.setattr(T.TaskGenerator, "batch", spy)
    validated = []
    real_counts = train_module.validation_counts
    monkeypatch.setattr(train_module, "validation_counts",
                        lambda model, gen, n, *a, **k: validated.append(n) or real_counts(model, gen, n, *a, **k))
    train(_cfg(tmp_path, mixed_lengths=True))
    assert seen[:3] == [[1]] * 3                        # stage 1
    assert set().union(*map(set, seen[3:6])) == {1, 2}  # stage 2: 24 samples of 1 or 2 segments
    assert set().union(*map(set, seen[6:])) == {1, 2, 3}
    assert validated == [1, 2, 3]
    assert [m["stage"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if m["event"] == "stage_end"] \
        == [1, 2, 3]


def test_cli_flag(tmp_path):
    import argparse

    from rmt_fast.train import add_cli

    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    args = parser.parse_args(["train", str(tmp_path), "--mixed-lengths"])
    assert args.mixed_lengths is True
    assert parser.parse_args(["train", str(tmp_path)]).mixed_lengths is False
