"""95% Clopper-Pearson intervals of the accuracies (Figure 1's shaded bands and table column)."""
import json

import pytest

from rmt_fast import evaluate as E


@pytest.mark.parametrize("correct,samples,low,high", [
    # R: binom.test(k, n)$conf.int
    (18, 20, 0.6830, 0.9877), (5, 10, 0.1871, 0.8129), (0, 10, 0.0, 0.3085), (20, 20, 0.8316, 1.0),
    (100, 100, 0.9638, 1.0), (1, 200, 0.000127, 0.02755),
])
def test_clopper_pearson_known_values(correct, samples, low, high):
    lo, hi = E.clopper_pearson(correct, samples)
    assert lo == pytest.approx(low, abs=1e-4) and hi == pytest.approx(high, abs=1e-4)


def test_rows_carry_their_interval_into_table_and_json(tmp_path):
    rows = [E.Row(model="m", task="detect", n_segments=n, n_tokens=51 * n, samples=20, correct=c,
                  accuracy=c / 20, seconds=1.0) for n, c in ((1, 20), (2, 18))]
    assert rows[1].ci_low == pytest.approx(0.6830, abs=1e-4)
    paths = E.write_outputs(rows, tmp_path, with_plot=False)
    assert "| 90.0% | 68.3-98.8% |" in paths["table"].read_text()
    data = json.loads(paths["json"].read_text())["rows"]
    assert data[0]["ci_low"] == pytest.approx(0.8316, abs=1e-4) and data[0]["ci_high"] == 1.0
    # Read back from JSON (the interval already there), a row keeps it.
    assert E.Row(**data[1]).ci_high == pytest.approx(rows[1].ci_high)
