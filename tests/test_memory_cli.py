"""``rmt-fast read`` / ``rmt-fast ask``: a document read in two appends, then asked, equals classify."""
import json

import pytest
import torch

from helpers import WORDS, save_model_with_vocab
from rmt_fast import Engine
from rmt_fast.cli import main
from rmt_fast.tokenize import load_tokenizer



@pytest.fixture
def model_dir(tmp_path):
    return save_model_with_vocab(tmp_path / "model", segment_alignment="left")


def test_read_append_ask_equals_classify(model_dir, tmp_path, capsys):
    model, d = model_dir
    part_a = " ".join(WORDS[i % 12] for i in range(37)) + " "
    part_b = " ".join(WORDS[(i * 5) % 12] for i in range(50))
    (tmp_path / "a.txt").write_text(part_a)
    (tmp_path / "b.txt").write_text(part_b)
    state = tmp_path / "doc.rmtstate"
    assert main(["read", "--model", str(d), "--input", str(tmp_path / "a.txt"), "--state", str(state),
                 "--no-progress"]) == 0
    assert main(["read", "--model", str(d), "--input", str(tmp_path / "b.txt"), "--state", str(state),
                 "--append", "--no-progress"]) == 0
    capsys.readouterr()
    questions = ["the dog ran", "a cat sat on the mat far away ."]
    assert main(["ask", "--state", str(state), "--json"] + sum((["--question", q] for q in questions), [])) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    tok = load_tokenizer(d)
    want = Engine(model).classify_texts([part_a + part_b + " " + q for q in questions], tok).softmax(-1)
    for line, q, p in zip(lines, questions, want):
        assert line["question"] == q
        got = torch.tensor([line["probabilities"][lab] for lab in "abcdef"])
        assert (got - p).abs().max() <= 1e-5
        assert line["label"] == "abcdef"[int(p.argmax())]


def test_read_and_ask_errors_name_the_flag_or_file(model_dir, tmp_path, capsys):
    _, d = model_dir
    (tmp_path / "a.txt").write_text("the cat")
    assert main(["read", "--model", str(d), "--input", str(tmp_path / "a.txt"), "--state",
                 str(tmp_path / "new.rmtstate"), "--append"]) == 2
    assert "--append" in capsys.readouterr().err
    (tmp_path / "bad.rmtstate").write_bytes(b"\x08\x00\x00")
    assert main(["ask", "--state", str(tmp_path / "bad.rmtstate"), "--question", "x"]) == 2
    assert "bad.rmtstate" in capsys.readouterr().err
    assert main(["read", "--model", str(d), "--input", str(tmp_path / "a.txt"), "--state",
                 str(tmp_path / "s.rmtstate"), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["ask", "--state", str(tmp_path / "s.rmtstate")]) == 2
    assert "--question" in capsys.readouterr().err


def test_demo_ask_reads_once_and_answers_as_classify(capsys):
    assert main(["demo", "--tokens", "3000", "--seed", "3"]) == 0
    plain = capsys.readouterr().out
    assert main(["demo", "--tokens", "3000", "--seed", "3", "--ask"]) == 0
    out = capsys.readouterr().out
    assert "read once:" in out and out.count(" ms") >= 4
    asked = next(line for line in out.splitlines() if "truth:" in line).split()
    answer = next(line for line in plain.splitlines() if line.startswith("answer:")).split()
    assert asked[asked.index("truth:") + 1] == answer[answer.index("truth:") + 1]
    # The sample is n_segments * S tokens: the reader's cuts are the classifier's, so the answer is the same.
    assert answer[1] in asked and answer[2] in asked
