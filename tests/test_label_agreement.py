"""benchmarks/label_agreement.py: two evaluate runs of the same samples compared label by label."""
import importlib.util
import json
from pathlib import Path

import pytest

from rmt_fast import evaluate as E

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "label_agreement.py"
spec = importlib.util.spec_from_file_location("label_agreement", SCRIPT)
LA = importlib.util.module_from_spec(spec)
spec.loader.exec_module(LA)


def _run(folder, dtype, predicted_by_length, labels, seed=1234):
    rows = [E.Row(model="m", task="memorize", n_segments=n, n_tokens=27 * n, samples=len(p),
                  correct=sum(x == y for x, y in zip(p, labels)), accuracy=sum(x == y for x, y in zip(p, labels)) / len(p),
                  seconds=0.0, predicted=list(p)) for n, p in predicted_by_length.items()]
    return E.write_outputs(rows, folder, {"dtype": dtype, "seed": seed, "split": "test"}, with_plot=False)["json"]


def test_counts_agreement_and_names_the_samples_that_differ(tmp_path, capsys):
    labels = [0, 1, 2, 3, 4, 5]
    a = _run(tmp_path / "a", "float32", {16: [0, 1, 2, 3, 4, 5], 4096: [0, 1, 2, 3, 4, 0]}, labels)
    b = _run(tmp_path / "b", "bfloat16", {16: [0, 1, 2, 3, 4, 5], 4096: [0, 1, 5, 3, 4, 1]}, labels)
    assert LA.main([str(a), str(b), "--out", str(tmp_path / "out")]) == 0
    rows = json.loads((tmp_path / "out" / "agreement.json").read_text())["rows"]
    assert [(r["segments"], r["agree"], r["differ_at"]) for r in rows] == [(16, 6, []), (4096, 4, [2, 5])]
    assert rows[1]["accuracy_a"] == pytest.approx(5 / 6) and rows[1]["accuracy_b"] == pytest.approx(4 / 6)
    out = capsys.readouterr().out
    assert "| memorize | 4096 | 6 | 4/6 | 83.3% (6) | 66.7% (6) | 2, 5 |" in out and "accuracy bfloat16" in out


def test_a_shorter_run_is_compared_with_the_first_samples_of_the_longer(tmp_path):
    a = _run(tmp_path / "a", "float32", {4096: [0, 1, 2, 3]}, [0, 1, 2, 3])
    b = _run(tmp_path / "b", "bfloat16", {4096: [0, 5]}, [0, 1])
    (row,) = LA.agreement(LA.load(a), LA.load(b))
    assert (row["samples"], row["agree"], row["differ_at"], row["samples_a"], row["samples_b"]) == (2, 1, [1], 4, 2)


def test_other_samples_are_an_error(tmp_path):
    a = _run(tmp_path / "a", "float32", {16: [0, 1]}, [0, 1])
    with pytest.raises(SystemExit, match="other samples"):
        LA.main([str(a), str(_run(tmp_path / "b", "bfloat16", {16: [0, 1]}, [0, 1], seed=7))])
    with pytest.raises(SystemExit, match="no .* row is in both"):
        LA.main([str(a), str(_run(tmp_path / "d", "bfloat16", {8: [0, 1]}, [0, 1]))])
