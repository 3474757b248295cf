"""Evaluation: accuracy rows through the Engine, output files, CLI, sharding over two CPU processes."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rmt_fast import evaluate as E
from rmt_fast import tasks as T
from rmt_fast.train import TrainConfig, build_model, save_model

ROOT = Path(__file__).resolve().parents[1]
BERT_CASED = str(ROOT / "rmt_fast" / "data" / "bert-base-cased")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random tiny model saved in rmt_fast's format with its tokenizer (accuracy is beside the point)."""
    torch.manual_seed(0)
    cfg = TrainConfig(out_dir="", backbone=BERT_CASED, random_init=True, num_layers=1, hidden_size=32,
                      num_heads=2, intermediate_size=64, input_size=32, num_mem_tokens=2)
    model, tok = build_model(cfg)
    d = tmp_path_factory.mktemp("model") / "tiny"
    save_model(model.eval(), tok, d)
    return d


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_default_lengths():
    assert E.default_lengths(1) == [1]
    assert E.default_lengths(16) == [1, 2, 4, 8, 16]
    assert E.default_lengths(12) == [1, 2, 4, 8, 12]
    assert E.default_lengths(4096)[-3:] == [1024, 2048, 4096]
    assert E.samples_at(2048, 100, 20, 1024) == 20 and E.samples_at(512, 100, 20, 1024) == 100


def test_predict_goes_through_engine_and_matches_model(model_dir):
    from rmt_fast.model import RMTForSequenceClassification

    model = RMTForSequenceClassification.from_pretrained(model_dir)
    tok = T.load_tokenizer(model_dir)
    docs, _ = T.TaskGenerator("detect", tok, model.config, split="test").batch(3, range(5))
    with torch.no_grad():
        ref = model(docs).logits
    torch.testing.assert_close(E.predict(model, docs, batch_size=2), ref, rtol=1e-4, atol=1e-4)


def test_evaluate_model_rows_and_output_files(model_dir, tmp_path):
    from rmt_fast.model import RMTForSequenceClassification

    model = RMTForSequenceClassification.from_pretrained(model_dir)
    tok = T.load_tokenizer(model_dir)
    rows = E.evaluate_model(model, tok, "memorize", [1, 2, 4], samples=12, name="tiny", long_samples=5,
                            long_from=4, batch_size=4)
    assert [(r.n_segments, r.samples, r.n_tokens) for r in rows] == [(1, 12, 27), (2, 12, 54), (4, 5, 108)]
    for r in rows:
        assert 0 <= r.correct <= r.samples and r.accuracy == pytest.approx(r.correct / r.samples)
    # The counts are those of classifying the same samples one by one.
    gen = T.TaskGenerator("memorize", tok, model.config, split="test", seed=1234)
    docs, labels = gen.batch(2, range(12))
    assert rows[1].correct == int((E.predict(model, docs).argmax(-1) == labels).sum())
    # Each sample's predicted label, in sample order (what two runs are compared by).
    assert rows[1].predicted == E.predict(model, docs).argmax(-1).tolist()
    assert [len(r.predicted) for r in rows] == [12, 12, 5]

    paths = E.write_outputs(rows, tmp_path / "out", {"note": "x"})
    data = json.loads(paths["json"].read_text())
    assert data["meta"] == {"note": "x"} and len(data["rows"]) == 3 and data["rows"][2]["n_segments"] == 4
    assert paths["table"].read_text().count("| tiny | memorize |") == 3
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_writes_table_json_and_plot(model_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    E.add_cli(parser.add_subparsers())
    args = parser.parse_args(["evaluate", f"mine={model_dir}", "--task", "detect", "--task", "reasoning",
                              "--max-segments", "2", "--samples", "4", "--out", str(tmp_path / "ev"),
                              "--no-progress"])
    assert args.func(args) == 0
    data = json.loads((tmp_path / "ev" / "accuracy.json").read_text())
    assert [(r["model"], r["task"], r["n_segments"]) for r in data["rows"]] == [
        ("mine", "detect", 1), ("mine", "detect", 2), ("mine", "reasoning", 1), ("mine", "reasoning", 2)]
    assert "| mine | reasoning | 2 |" in capsys.readouterr().out
    assert (tmp_path / "ev" / "accuracy.png").stat().st_size > 1000


def test_dtype_flag_builds_the_engine_in_that_dtype(model_dir, tmp_path, monkeypatch):
    import rmt_fast.engine as engine_module

    dtypes = []

    class RecordingEngine(engine_module.Engine):
        def __init__(self, *a, **k):
            dtypes.append(k.get("dtype"))
            super().__init__(*a, **k)

    monkeypatch.setattr(engine_module, "Engine", RecordingEngine)
    parser = argparse.ArgumentParser()
    E.add_cli(parser.add_subparsers())
    for dtype in ("float32", "bfloat16"):
        args = parser.parse_args(["evaluate", str(model_dir), "--task", "detect", "--lengths", "2",
                                  "--samples", "5", "--out", str(tmp_path / dtype), "--no-progress", "--no-plot"]
                                 + (["--dtype", dtype] if dtype != "float32" else []))
        assert args.func(args) == 0
        data = json.loads((tmp_path / dtype / "accuracy.json").read_text())
        assert data["meta"]["dtype"] == dtype and len(data["rows"][0]["predicted"]) == 5
    assert dtypes == ["float32", "bfloat16"]
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate", "--dtype", "int4"])


def test_sharded_over_two_processes_equals_one(model_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    common = ["-m", "rmt_fast.evaluate", str(model_dir), "--task", "detect", "--lengths", "1,3",
              "--samples", "7", "--batch-size", "3", "--no-progress", "--threads", "1"]
    for name, launcher in (("two", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                    "--master_port", str(_free_port())]),
                           ("one", [sys.executable])):
        r = subprocess.run(launcher + common + ["--out", str(tmp_path / name)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "accuracy.json").read_text())
    one = json.loads((tmp_path / "one" / "accuracy.json").read_text())
    assert two["meta"]["processes"] == 2 and one["meta"]["processes"] == 1
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(two["rows"]) == strip(one["rows"])
    assert [r["samples"] for r in two["rows"]] == [7, 7]


def test_accuracy_of_the_shipped_model_on_memorize_at_one_segment():
    """A model of known behaviour: the shipped default model answers Memorize at one segment (measured
    60 of 60 on the test split). The labels of these samples cover every class, so a predicted label off
    by one, or compared with the wrong sample's label, gives an accuracy near zero."""
    from rmt_fast.model import RMTForSequenceClassification

    d = E.default_model_dir()
    model = RMTForSequenceClassification.from_pretrained(d)
    tok = T.load_tokenizer(d)
    rows = E.evaluate_model(model, tok, "memorize", [1], samples=48, batch_size=16, name="default")
    _, labels = T.TaskGenerator("memorize", tok, model.config, split="test", seed=1234).batch(1, range(48))
    assert len(set(labels.tolist())) == len(T.LABEL_NAMES)
    assert rows[0].samples == 48 and rows[0].accuracy >= 0.95, rows[0]


def test_one_engine_per_model_and_run(model_dir, tmp_path, monkeypatch):
    import rmt_fast.engine as engine_module

    built = []

    class CountingEngine(engine_module.Engine):
        def __init__(self, *a, **k):
            built.append(1)
            super().__init__(*a, **k)

    monkeypatch.setattr(engine_module, "Engine", CountingEngine)
    parser = argparse.ArgumentParser()
    E.add_cli(parser.add_subparsers())
    # 3 lengths x 2 tasks, 5 samples in chunks of 2 documents: one Engine for all of it.
    args = parser.parse_args(["evaluate", str(model_dir), "--task", "memorize", "--task", "detect", "--lengths",
                              "1,2,3", "--samples", "5", "--batch-size", "2", "--out", str(tmp_path / "ev"),
                              "--no-progress", "--no-plot"])
    assert args.func(args) == 0
    assert len(built) == 1


def test_table_printed_before_a_failing_write(model_dir, tmp_path, monkeypatch, capsys):
    from rmt_fast import files
    from rmt_fast.cli import main

    def disk_full(path, text):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(files, "write_text", disk_full)
    code = main(["evaluate", f"mine={model_dir}", "--task", "detect", "--lengths", "1", "--samples", "3",
                 "--out", str(tmp_path / "ev"), "--no-progress", "--no-plot"])
    out, err = capsys.readouterr()
    assert code == 2 and "| mine | detect | 1 |" in out
    assert err.startswith("error: [Errno 28] No space left on device") and "accuracy.json" in err


def test_missing_matplotlib_fails_before_compute(model_dir, tmp_path, monkeypatch, capsys):
    import sys

    from rmt_fast.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setattr(E, "evaluate_model", lambda *a, **k: pytest.fail("computed before the check"))
    assert main(["evaluate", str(model_dir), "--out", str(tmp_path / "ev"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "plots need matplotlib" in err and "rmt_fast[plot]" in err and "--no-plot" in err
    monkeypatch.setattr(E, "evaluate_model", lambda *a, **k: [])
    assert main(["evaluate", str(model_dir), "--out", str(tmp_path / "ev"), "--no-progress", "--no-plot"]) == 0
    assert sorted(p.name for p in (tmp_path / "ev").iterdir()) == ["accuracy.json", "accuracy.md"]
