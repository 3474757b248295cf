"""The device memory budget: perfmodel.estimate's slot choice, ``Engine(max_memory=...)`` and
``rmt-fast classify --max-memory`` (the arithmetic against real tensors is in test_perfmodel.py)."""
import logging

import pytest
import torch

from helpers import random_docs, tiny_model
from rmt_fast import Engine
from rmt_fast.cli import main
from rmt_fast.engine.options import RunOptions
from rmt_fast.perfmodel import estimate, parse_size
from test_perfmodel import _tensors

GIB = 2 ** 30


def _tiny_dims(model):
    return estimate.dims_of(model.config, model.model.config)


@pytest.mark.parametrize("dtype, cuda", [("float32", True), ("bfloat16", True), ("float32", False)])
def test_slot_choice_at_the_boundary(dtype, cuda):
    d = estimate.bert_base()
    b = estimate.max_batch(d, dtype, cuda, 10 * GIB)
    assert b >= 3
    peaks = [estimate.peak_bytes(d, k, dtype, cuda) for k in range(1, b + 2)]
    assert all(p < q for p, q in zip(peaks, peaks[1:]))       # the bisection's premise, for bert-base
    assert peaks[b - 1] <= 10 * GIB < peaks[b]
    assert estimate.max_batch(d, dtype, cuda, peaks[b - 1]) == b
    assert estimate.max_batch(d, dtype, cuda, peaks[b - 1] - 1) == b - 1
    assert estimate.max_batch(d, dtype, cuda, peaks[0]) == 1
    assert estimate.max_batch(d, dtype, cuda, peaks[0] - 1) == 0


def test_graph_pool_is_one_more_step():
    d = estimate.bert_base()
    on = estimate.memory_parts(d, 4, "float32", cuda=True)
    off = estimate.memory_parts(d, 4, "float32", cuda=True, graphs=False)
    assert on["graph pool"] == on["activations"] + on["gathered memory"]
    assert "graph pool" not in off and "graph pool" not in estimate.memory_parts(d, 4, "float32", cuda=False)
    assert estimate.peak_bytes(d, 4, "float32", True) - estimate.peak_bytes(d, 4, "float32", True, False) \
        == on["graph pool"]


def test_engine_chooses_the_most_slots_that_fit(caplog):
    model = tiny_model()
    d = _tiny_dims(model)
    peak = [estimate.peak_bytes(d, k, "float32", cuda=False) for k in range(1, 6)]
    with caplog.at_level(logging.INFO, logger="rmt_fast.engine.runner"):
        engine = Engine(model, dtype="float32", max_memory=peak[3])
    assert engine.max_slots == 4 and engine.max_memory == peak[3]
    assert "batch 4" in caplog.text
    assert Engine(model, dtype="float32", max_memory=peak[3] - 1).max_slots == 3
    assert Engine(model, dtype="float32", max_memory=f"{peak[4]}B").max_slots == 5
    assert Engine(model, dtype="float32").max_slots is None
    with pytest.raises(ValueError, match=rf"cannot fit one slot: .* needs at least {peak[0]} bytes"):
        Engine(model, dtype="float32", max_memory=peak[0] - 1)


def test_a_budget_the_weights_fill_holds_no_slot():
    """Against the plan's real tensors, not the model's own sum: the weights count toward the budget."""
    model = tiny_model()
    plan = Engine(model, dtype="float32", packed_weights=False).plan
    weights = sum({t.data_ptr(): t.nbytes for t in _tensors(plan)}.values())
    with pytest.raises(ValueError, match="cannot fit one slot"):
        Engine(model, dtype="float32", packed_weights=False, max_memory=weights)


def test_engine_runs_at_most_max_slots():
    model = tiny_model()
    peak3 = estimate.peak_bytes(_tiny_dims(model), 3, "float32", cuda=False)
    engine = Engine(model, dtype="float32", max_memory=peak3)
    engine.static_loop = True                        # the CUDA loop on the CPU: its runner is kept per width
    docs = random_docs([5, 40, 90, 17, 130, 3, 66], model.config.vocab_size, low=3)
    got = engine.classify(docs)                      # no batch_size: max_slots
    assert set(engine._runners) == {3}
    (runner,) = engine._runners.values()
    parts = estimate.memory_parts(_tiny_dims(model), 3, "float32", cuda=True)
    assert runner.state.nbytes == parts["memory state"] and runner.results.nbytes == parts["result rows"]
    assert runner.ring_ids.nbytes + runner.ring_meta.nbytes == parts["device ring (ids + meta)"]
    torch.testing.assert_close(got, Engine(model, dtype="float32").classify(docs, batch_size=2), rtol=1e-5, atol=1e-5)
    assert engine.classify(docs, batch_size=2).shape == got.shape
    with pytest.raises(ValueError, match=r"batch_size \(--batch-size\) 4 does not fit .* at most 3 slots"):
        engine.classify(docs, batch_size=4)
    with pytest.raises(ValueError, match="at most 3 slots"):
        engine._batch(None, RunOptions(batch_size=4))  # a batch_size given in options is explicit too
    assert engine._batch(None, None) == 3 and Engine(model)._batch(None, None) == 8


@pytest.mark.parametrize("text, want", [("10GiB", 10 * GIB), ("3.5 GB", 3_500_000_000), ("512MiB", 2 ** 29),
                                        (1000, 1000), ("1.5e9", 1_500_000_000)])
def test_parse_size(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("bad", ["ten", "-1GiB", "0", "5PB", "1.2.3", 0, True])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError, match="max_memory"):
        parse_size(bad, "max_memory")


def test_cli_max_memory(tmp_path, capsys):
    model = tiny_model()
    d = tmp_path / "model"
    model.save_pretrained(d)
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
                                           + [f"w{i}" for i in range(model.config.vocab_size - 5)]) + "\n")
    text = tmp_path / "a.txt"
    text.write_text("w1 w2 w3 " * 30)
    args = ["classify", "--model", str(d), "--input", str(text), "--no-progress", "--dtype", "float32"]
    assert main(args + ["--max-memory", "1MiB"]) == 0
    assert main(args + ["--max-memory", "1KiB"]) != 0
    err = capsys.readouterr().err
    assert "--max-memory" in err and "cannot fit one slot" in err
    peak2 = estimate.peak_bytes(_tiny_dims(model), 2, "float32", cuda=False)
    assert main(args + ["--max-memory", str(peak2), "--batch-size", "3"]) != 0
    assert "--batch-size" in capsys.readouterr().err
