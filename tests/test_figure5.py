"""Figure 5 (``rmt-fast evaluate --run``): every curriculum stage's best model of a training run,
evaluated up to 4x the longest training length; the grid's shape, axes and files."""
import argparse
import json
from pathlib import Path

import pytest
import torch

from rmt_fast import evaluate as E
from rmt_fast import plotting
from rmt_fast import tasks as T
from rmt_fast.cli import main
from rmt_fast.model import RMTForSequenceClassification
from rmt_fast.train import TrainConfig, build_model, save_model

BERT_CASED = str(Path(__file__).resolve().parents[1] / "rmt_fast" / "data" / "bert-base-cased")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A training folder with two tiny stage models, each leaning to another label so they differ."""
    run = tmp_path_factory.mktemp("train")
    for n, favourite in ((1, 0), (2, 2)):
        torch.manual_seed(n)
        cfg = TrainConfig(out_dir="", backbone=BERT_CASED, random_init=True, num_layers=1, hidden_size=32,
                          num_heads=2, intermediate_size=64, input_size=40, num_mem_tokens=2)
        model, tok = build_model(cfg)
        with torch.no_grad():
            model.model.classifier.bias[favourite] += 3.0
        save_model(model.eval(), tok, run / "stages" / str(n) / "best")
    (run / "stages" / "2" / "best.old").mkdir()            # left by a kill: not a stage
    return run


def test_grid_lengths():
    assert E.grid_lengths(2) == [1, 2, 4, 6, 8]
    assert E.grid_lengths(9) == [1, 2, 4, 8, 9, 16, 18, 27, 32, 36]
    assert E.grid_lengths(3, factor=1) == [1, 2, 3]


def test_run_writes_grid_table_json_and_heatmap(run_dir, tmp_path, monkeypatch):
    drawn = []
    real_savefig = plotting.savefig

    def keep_axes(fig, path, **kw):
        drawn.append([(ax.get_title(), [t.get_text() for t in ax.get_xticklabels()],
                       [t.get_text() for t in ax.get_yticklabels()], ax.get_xlabel(), ax.get_ylabel())
                      for ax in fig.axes if ax.get_title()])
        real_savefig(fig, path, **kw)

    monkeypatch.setattr(plotting, "savefig", keep_axes)
    out = tmp_path / "fig5"
    assert main(["evaluate", "--run", str(run_dir), "--task", "memorize", "--task", "reasoning", "--samples", "24",
                 "--batch-size", "8", "--seed", "5", "--out", str(out), "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.json", "accuracy.md", "heatmap.png"]
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    data = json.loads((out / "accuracy.json").read_text())
    lengths = [1, 2, 4, 6, 8]
    assert list(data["grid"]) == ["memorize", "reasoning"]
    for task, g in data["grid"].items():
        assert g["train_segments"] == [1, 2] and g["eval_segments"] == lengths
        assert len(g["accuracy"]) == 2 and all(len(row) == len(lengths) for row in g["accuracy"])
    assert len(data["rows"]) == 2 * 2 * len(lengths)

    # Each cell is its own stage's model at that length (the stages' answers differ, so a swap shows).
    for n in (1, 2):
        d = run_dir / "stages" / str(n) / "best"
        model = RMTForSequenceClassification.from_pretrained(d)
        for task in ("memorize", "reasoning"):
            rows = E.evaluate_model(model, T.load_tokenizer(d), task, lengths, samples=24, batch_size=8, seed=5)
            assert data["grid"][task]["accuracy"][n - 1] == [r.accuracy for r in rows]
    assert data["grid"]["memorize"]["accuracy"][0] != data["grid"]["memorize"]["accuracy"][1]

    table = (out / "accuracy.md").read_text()
    assert "| trained on | 1 | 2 | 4 | 6 | 8 |" in table and table.count("| stage 2 | reasoning |") == len(lengths)
    (panels,) = drawn
    assert [p[0] for p in panels] == ["memorize", "reasoning"]
    for _, xticks, yticks, xlabel, ylabel in panels:
        assert xticks == [str(e) for e in lengths] and yticks == ["1", "2"]
        assert "evaluated" in xlabel and "trained" in ylabel


def test_run_errors_name_the_flag(run_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["evaluate", "--run", str(empty), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "--run" in capsys.readouterr().err
    assert main(["evaluate", "--run", str(run_dir), "--run", str(run_dir), "--out", str(tmp_path / "o")]) == 2
    assert "stage 1" in capsys.readouterr().err
    assert main(["evaluate", str(run_dir / "stages" / "1" / "best"), "--run", str(run_dir),
                 "--out", str(tmp_path / "o")]) == 2
    assert "--run" in capsys.readouterr().err


def test_train_run_reaches_the_module_under_torchrun():
    """torchrun's own parser takes "--run" as an abbreviation of its --run-path (and stops with "ambiguous
    option") before rmt_fast.evaluate sees it; --train-run is the same flag and passes through."""
    from torch.distributed.run import get_args_parser

    torchrun = get_args_parser()
    args = torchrun.parse_args(["--nproc_per_node", "2", "-m", "rmt_fast.evaluate", "--train-run", "R1",
                                "--task", "detect"])
    assert args.training_script_args == ["--train-run", "R1", "--task", "detect"]
    parser = argparse.ArgumentParser()
    E.add_cli(parser.add_subparsers())
    ours = parser.parse_args(["evaluate", *args.training_script_args, "--train-run", "R2"])
    assert ours.run == ["R1", "R2"]
    with pytest.raises(SystemExit):
        torchrun.parse_args(["--nproc_per_node", "2", "-m", "rmt_fast.evaluate", "--run", "R1"])
