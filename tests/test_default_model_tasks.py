"""The shipped default model on the new backgrounds (issue 15): it answers the demo's Reasoning
document with a place, and holds Memorize and Detect & Memorize on the kind of text it never saw
(the King James Bible: the heldout split)."""
import pytest

from rmt_fast import evaluate as E
from rmt_fast import tasks as T
from rmt_fast.cli import main
from rmt_fast.model import RMTForSequenceClassification


@pytest.fixture(scope="module")
def shipped():
    d = E.default_model_dir()
    return RMTForSequenceClassification.from_pretrained(d), T.load_tokenizer(d)


def test_demo_answers_a_reasoning_document(capsys):
    assert main(["demo", "--task", "reasoning", "--tokens", "600", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert "(task 'reasoning')" in out and "test-split background" in out
    facts = next(line for line in out.splitlines() if line.startswith("hidden fact(s):"))
    assert facts.count(" is ") == 2 and facts.count("segment") == 2             # both facts, both placed
    answer = next(line for line in out.splitlines() if line.startswith("answer:")).split()
    assert answer[1] in T.PLACES and answer[answer.index("truth:") + 1] in T.PLACES


@pytest.mark.parametrize("task", ["memorize", "detect"])
def test_memorize_and_detect_on_the_heldout_kind(shipped, task):
    """Measured 200/200 on both at 16 segments (docs/RESULTS.md); 46 of 48 leaves room for one or two."""
    model, tok = shipped
    (row,) = E.evaluate_model(model, tok, task, [8], samples=48, batch_size=48, split="heldout", seed=7)
    assert row.correct >= 46, row
