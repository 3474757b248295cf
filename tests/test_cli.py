"""The command line: classify (good files answered, bad files named), info, python -m rmt_fast."""
import json
import subprocess
import sys

import pytest
import torch

from helpers import tiny_model
from rmt_fast import Engine
from rmt_fast.cli import main
from rmt_fast.tokenize import load_tokenizer

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "away", ".", ","]


@pytest.fixture
def model_dir(tmp_path):
    model = tiny_model(label_names=("a", "b", "c", "d", "e", "f"))
    d = tmp_path / "model"
    model.save_pretrained(d)
    vocab = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"] + WORDS
    vocab += [f"w{i}" for i in range(model.config.vocab_size - len(vocab))]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return model, d


def test_classify_reports_bad_files_and_keeps_good_results(model_dir, tmp_path, capsys):
    model, d = model_dir
    good = tmp_path / "good.txt"
    good.write_text(" ".join(WORDS * 40), encoding="utf-8")
    good2 = tmp_path / "good2.txt"
    good2.write_bytes("\ufeffthe dog ran far away .".encode("utf-8"))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("the caf\xe9 cat".encode("latin-1"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    missing = tmp_path / "missing.txt"
    code = main(["classify", "--model", str(d), "--input", str(good), str(latin1), str(empty), str(missing),
                 str(good2), "--json", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 1
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["input"] for r in rows] == [str(good), str(good2)]
    assert "latin1.txt: not valid UTF-8 at byte 7" in err
    assert "empty.txt: no tokens left" in err and "missing.txt" in err
    tokenizer = load_tokenizer(d)
    want = torch.softmax(Engine(model).classify_texts([good.read_text(), "the dog ran far away ."], tokenizer), -1)
    for r, p in zip(rows, want):
        assert r["label"] == "abcdef"[int(p.argmax())]
        assert list(r["probabilities"].values()) == pytest.approx(p.tolist(), abs=1e-5)


def test_classify_replace_decoding_and_empty_special(model_dir, tmp_path, capsys):
    _, d = model_dir
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("the caf\xe9 cat".encode("latin-1"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code = main(["classify", "--model", str(d), "--input", str(latin1), str(empty), "--decode-errors", "replace",
                 "--empty", "special", "--no-progress"])
    out, _ = capsys.readouterr()
    assert code == 0 and len(out.splitlines()) == 2


def test_classify_missing_device_is_a_clear_error(model_dir, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    _, d = model_dir
    f = tmp_path / "t.txt"
    f.write_text("the cat")
    assert main(["classify", "--model", str(d), "--input", str(f), "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_python_dash_m_info():
    res = subprocess.run([sys.executable, "-m", "rmt_fast", "info"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "torch" in res.stdout and "attention cpu/float32" in res.stdout


def test_demo_on_the_shipped_model(capsys):
    assert main(["demo", "--tokens", "3000", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "hidden fact(s):" in out and "truth:" in out and "segments/s" in out
