"""rmt-fast bench: its JSON, baselines stopped (never extrapolated) past a budget, the mixed workload's
seeded lengths, and the reference baseline being the reference (the oracle's logits, padded batch)."""
import json
import math
import shlex

import pytest
import torch

from helpers import oracle, random_docs, tiny_model
from rmt_fast.baselines import BaselineStopped, ReferenceBaseline
from rmt_fast.benchmark import models, systems, workloads
from rmt_fast.cli import build_parser, main

ROW_KEYS = {"system", "batch_size", "segments", "ms_per_segment", "tokens_per_s", "peak_mib", "memory_measure",
            "stopped"}


@pytest.fixture
def tiny_dir(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny", model


def _bench(argv, tmp_path, capsys, plot=False):
    out = tmp_path / "out"
    flags = [] if plot else ["--no-plot"]
    assert main(["bench", "--no-progress", "--out", str(out), "--dtype", "float32"] + flags + argv) == 0
    return json.loads((out / "bench.json").read_text()), capsys.readouterr().out


def test_bench_json_rows_and_baselines_stopped_past_a_tiny_budget(tiny_dir, tmp_path, capsys):
    path, _ = tiny_dir
    doc, printed = _bench(["--model", str(path), "--segments", "1,3,5", "--batch-sizes", "1,2",
                           "--budget-s", "1e-9"], tmp_path, capsys)
    meta = doc["meta"]
    assert {"cpu", "device"} <= set(meta["machine"]) and {"torch", "transformers", "python"} <= set(meta["versions"])
    assert meta["command"].startswith("rmt-fast bench ") and "--budget-s 1e-09" in meta["command"]
    again = build_parser().parse_args(shlex.split(meta["command"])[1:])      # the command repeats the run
    assert again.model == str(path) and again.segments == [1, 3, 5] and again.batch_sizes == [1, 2]
    assert again.budget_s == 1e-9 and again.no_plot and again.dtype == "float32"
    rows = doc["rows"]
    assert [(r["batch_size"], r["segments"], r["system"]) for r in rows] == [
        (B, n, s) for B in (1, 2) for n in (1, 3, 5) for s in ("engine", "reference", "tuned")]
    for r in rows:
        assert ROW_KEYS <= set(r), r
        if r["system"] == "engine" or r["segments"] == 1:   # the Engine is never stopped; one step always runs
            assert r["stopped"] is None and r["ms_per_segment"] > 0 and r["peak_mib"] >= 0, r
            assert r["tokens_per_s"] == pytest.approx(1000 * 18 / r["ms_per_segment"])   # 18 tokens a segment
        else:                                                # stopped after its first segment: no time at all
            assert r["stopped"]["segments"] == 1 and r["stopped"]["reason"] == "time", r
            assert r["ms_per_segment"] is None and r["tokens_per_s"] is None
            assert r["stopped"].get("not_run", False) == (r["segments"] == 5)
    assert printed.count("stopped at 1 segments (time)") >= 8
    speedups = doc["speedups"]
    assert {(s["baseline"], s["batch_size"], s["segments"]) for s in speedups} == {
        (b, B, 1) for b in ("reference", "tuned") for B in (1, 2)}


def test_a_generous_budget_lets_the_baselines_finish_and_the_plots_are_drawn(tiny_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path, _ = tiny_dir
    doc, printed = _bench(["--model", str(path), "--segments", "1,4", "--budget-s", "600", "--timeline",
                           "--timeline-segments", "3"], tmp_path, capsys, plot=True)
    assert all(r["stopped"] is None and r["ms_per_segment"] > 0 for r in doc["rows"])
    for name in ("bench.png", "timeline.png"):
        assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG" and name in printed


def test_the_memory_limit_stops_a_baseline_and_a_stop_between_batches_counts_segments():
    stop = systems.stopper(torch.device("cpu"), None, limit_bytes=0)
    assert stop(1) == "memory"
    assert systems.stopper(torch.device("cpu"), 600.0, limit_bytes=None)(1) is None
    model = tiny_model()
    S = model.config.segment_size
    ref = systems.BaselineSystem("reference", model, torch.device("cpu"), torch.float32)
    docs = random_docs([2 * S, S, 3 * S, S], model.config.vocab_size, low=3)
    seen = []
    with pytest.raises(BaselineStopped) as e:   # the second batch (3 steps) is stopped after its first step
        ref.run(docs, 2, stop=lambda k: seen.append(k) or ("memory" if k >= 3 else None))
    assert (e.value.segments, e.value.reason) == (3, "memory") and seen == [1, 2, 3]


def test_mixed_lengths_are_reproducible_from_the_seed_and_log_uniform():
    a = workloads.mixed_lengths(64, 64, seed=7)
    assert a == workloads.mixed_lengths(64, 64, seed=7)
    assert a != workloads.mixed_lengths(64, 64, seed=8)
    many = workloads.mixed_lengths(4000, 64, seed=1)
    assert min(many) == 1 and max(many) == 64
    # log-uniform on [1, 65): half the mass below sqrt(65) ~ 8.06, a sixth in each factor-of-2 band
    assert abs(sum(n < math.sqrt(65) for n in many) / 4000 - 0.5) < 0.04
    assert abs(sum(16 <= n < 32 for n in many) / 4000 - math.log(2) / math.log(65)) < 0.03


def test_schedules_of_the_mixed_workload_by_hand():
    assert workloads.pad_to_longest_steps([5, 1, 1, 1], 2) == 6
    assert workloads.slot_steps([5, 1, 1, 1], 2) == 5
    assert workloads.pad_to_longest_steps([1, 2, 3], 8) == workloads.slot_steps([1, 2, 3], 8) == 3


def test_mixed_workload_from_the_cli(tiny_dir, tmp_path, capsys):
    path, _ = tiny_dir
    doc, printed = _bench(["--model", str(path), "--workload", "mixed", "--docs", "9", "--max-segments", "6",
                           "--seed", "3", "--batch-sizes", "3", "--budget-s", "600"], tmp_path, capsys)
    lengths = workloads.mixed_lengths(9, 6, seed=3)
    assert doc["mixed"]["lengths"] == lengths and doc["mixed"]["total_segments"] == sum(lengths)
    by = {(r["system"], r["batching"]): r for r in doc["rows"]}
    assert set(by) == {("engine", "slots"), ("engine", "pad-to-longest"), ("reference", "pad-to-longest"),
                       ("tuned", "pad-to-longest")}
    for (system, batching), r in by.items():
        assert r["docs"] == 9 and r["segments"] == sum(lengths) and r["docs_per_s"] > 0
        steps = (workloads.slot_steps if batching == "slots" else workloads.pad_to_longest_steps)(lengths, 3)
        assert r["steps"] == steps and r["row_utilization"] == pytest.approx(sum(lengths) / (3 * steps))
    assert "documents/s" in printed and "slots" in printed


def test_the_reference_baseline_gives_the_oracles_logits_on_a_padded_batch():
    """Documents of different lengths (a partial first segment, right-aligned): the reference's way."""
    model = tiny_model()
    S = model.config.segment_size
    docs = random_docs([S, 3 * S + 5, 2 * S - 1, 1], model.config.vocab_size, low=3)   # the longest not first
    want = torch.stack([oracle(model, d) for d in docs])
    steps = []
    with torch.no_grad():
        for keep, attn in ((True, "eager"), (False, "sdpa")):
            got = ReferenceBaseline(model, torch.float32, keep, attn).run(docs, on_step=steps.append)
            assert (got.double() - want).abs().max() <= 1e-5, (keep, attn)
    assert steps == [1, 2, 3, 4] * 2


def test_the_reference_baseline_timeline_records_every_step(tiny_dir, tmp_path, capsys):
    path, _ = tiny_dir
    doc, _ = _bench(["--model", str(path), "--segments", "1", "--timeline", "--timeline-segments", "6",
                     "--budget-s", "600"], tmp_path, capsys)
    tl = doc["timeline"]
    assert set(tl) == {"engine", "reference", "tuned"}
    assert tl["reference"]["segments"] == list(range(7)) and tl["reference"]["stopped"] is None
    assert len(tl["engine"]["allocated_mib"]) == len(tl["engine"]["segments"]) >= 2


def test_layers_of_the_users_model_and_bad_flags_name_the_flag(tiny_dir, tmp_path, capsys):
    path, _ = tiny_dir
    doc, _ = _bench(["--model", str(path), "--layers", "1", "--segments", "1", "--baselines", "none"],
                    tmp_path, capsys)
    assert doc["meta"]["model_shape"].startswith("1 layers") and {r["system"] for r in doc["rows"]} == {"engine"}
    assert len(models.user_model(path, None, 1).bert.encoder.layer) == 1     # the layers really go
    assert main(["bench", "--model", str(path), "--layers", "5", "--out", str(tmp_path / "o")]) == 2
    assert "--layers 5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--baselines", "reference,eager"])
    assert "argument --baselines:" in capsys.readouterr().err


def test_an_interrupted_run_keeps_the_points_already_finished(tiny_dir, tmp_path, monkeypatch, capsys):
    path, _ = tiny_dir
    real = systems.time_point
    calls = []

    def interrupt_the_fourth(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr("rmt_fast.benchmark.runs.time_point", interrupt_the_fourth)
    out = tmp_path / "out"
    assert main(["bench", "--model", str(path), "--segments", "1,2", "--no-progress", "--no-plot",
                 "--out", str(out)]) == 130
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert [(r["system"], r["segments"]) for r in rows] == [("engine", 1), ("reference", 1), ("tuned", 1)]


def test_max_memory_records_the_slots_the_budget_holds(tiny_dir, tmp_path, capsys):
    """--max-memory: the Engine's slot count from the memory model, printed and in bench.json."""
    from rmt_fast.perfmodel import estimate
    path, model = tiny_dir
    dims = estimate.dims_of(model.config, model.model.config)
    budget = estimate.peak_bytes(dims, 3, "float32", False)            # exactly three slots' peak
    doc, printed = _bench(["--model", str(path), "--segments", "1", "--batch-sizes", "2", "--baselines", "none",
                           "--max-memory", str(budget)], tmp_path, capsys)
    assert doc["meta"]["max_slots"] == 3 and doc["meta"]["max_memory"] == str(budget)
    assert "holds 3 slots" in printed
