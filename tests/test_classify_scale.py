"""``rmt-fast classify`` at scale: the results file (resume after a kill, part files of torchrun ranks
folded in input order), torchrun over 2 gloo processes, --input-list and the default --model."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import WORDS, save_model_with_vocab
from rmt_fast import Engine
from rmt_fast.cli import main
from rmt_fast.model import RMTForSequenceClassification
from rmt_fast.tokenize import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def model_dir(tmp_path):
    return save_model_with_vocab(tmp_path / "model")[1]


def _corpus(tmp_path, lengths, missing_at=()):
    """Text files of ``lengths`` random words (a name in ``missing_at`` is never written: it fails)."""
    folder = tmp_path / "docs"
    folder.mkdir(exist_ok=True)
    names = []
    for i, n in enumerate(lengths):
        f = folder / f"doc{i:03d}.txt"
        if i not in missing_at:
            words = [WORDS[j] for j in torch.randint(len(WORDS), (n,)).tolist()]
            f.write_text(" ".join(words), encoding="utf-8")
        names.append(str(f))
    return names


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def _assert_same_results(got, want):
    """Same inputs in the same order, same answers; logits equal in float32 within 1e-6."""
    assert [r["index"] for r in got] == list(range(len(want)))
    for g, w in zip(got, want):
        assert {k: v for k, v in g.items() if k not in ("logits", "probabilities")} == \
               {k: v for k, v in w.items() if k not in ("logits", "probabilities")}
        if w["logits"] is None:
            assert g["logits"] is None
        else:
            assert g["logits"] == pytest.approx(w["logits"], abs=1e-6, rel=0)


def _classify(model_dir, names, out, *extra):
    return main(["classify", "--model", str(model_dir), "--input", *names, "--output", str(out), "--no-progress",
                 "--batch-size", "3", *extra])


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT / "tests"))


def test_results_file_answers_each_input_in_order_with_sizes(model_dir, tmp_path, capsys):
    names = _corpus(tmp_path, [5, 300, 40, 1, 77], missing_at={2})
    out = tmp_path / "results.jsonl"
    assert _classify(model_dir, names, out) == 1            # one input failed
    rows = _lines(out)
    assert [r["input"] for r in rows] == names
    assert rows[2]["error"] and "doc002.txt" in capsys.readouterr().err and rows[2]["label"] is None
    model = RMTForSequenceClassification.load(model_dir)
    tok = load_tokenizer(model_dir)
    good = [i for i in range(5) if i != 2]
    texts = [Path(names[i]).read_text() for i in good]
    want = Engine(model).classify_texts(texts, tok)
    for i, w in zip(good, want):
        assert rows[i]["logits"] == pytest.approx(w.tolist(), abs=1e-5)
        assert rows[i]["label"] == "abcdef"[int(w.argmax())]
        ids = tok(texts[good.index(i)], add_special_tokens=False)["input_ids"]
        S = model.config.segment_size
        assert rows[i]["tokens"] == len(ids) and rows[i]["segments"] == -(-len(ids) // S)


def test_resume_after_sigkill_equals_the_uninterrupted_run(model_dir, tmp_path, capsys):
    names = _corpus(tmp_path, [300, 40, 250, 70, 300, 12, 280, 90, 300, 50, 260], missing_at={5})
    ref = tmp_path / "ref.jsonl"
    _classify(model_dir, names, ref)
    # Input 8 becomes a pipe no one writes to: the run blocks there, with earlier results written and
    # later ones in flight, and is killed at that moment.
    blocked = Path(names[8])
    text = blocked.read_bytes()
    blocked.unlink()
    os.mkfifo(blocked)
    out = tmp_path / "results.jsonl"
    cmd = [sys.executable, "-m", "rmt_fast", "classify", "--model", str(model_dir), "--input", *names,
           "--output", str(out), "--no-progress", "--batch-size", "3"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    written = out.read_bytes()
    k = written.count(b"\n")
    assert 3 <= k <= 8, (k, err.decode()[-2000:])
    blocked.unlink()
    blocked.write_bytes(text)
    # A kill mid-write leaves a partial line: resume drops it and keeps every complete one.
    with open(out, "ab") as f:
        f.write(b'{"index": %d, "input": "half a li' % k)
    capsys.readouterr()
    assert _classify(model_dir, names, out) == 1            # the missing file is still an error
    assert f"({len(names) - k} computed now, {k} from an earlier run)" in capsys.readouterr().err
    assert out.read_bytes().startswith(written)             # nothing written is rewritten or lost
    _assert_same_results(_lines(out), _lines(ref))


def test_torchrun_two_gloo_processes_equal_one(model_dir, tmp_path):
    names = _corpus(tmp_path, [900, 3, 400, 1200, 60, 5, 800], missing_at={4})
    one = tmp_path / "one.jsonl"
    assert _classify(model_dir, names, one) == 1
    two = tmp_path / "two.jsonl"
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(port), "-m", "rmt_fast", "classify", "--model", str(model_dir), "--input", *names,
                        "--output", str(two), "--no-progress", "--batch-size", "3"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "7 results (7 computed now" in r.stderr, r.stdout[-3000:] + r.stderr[-3000:]
    _assert_same_results(_lines(two), _lines(one))
    assert not list(tmp_path.glob("two.jsonl.part-*"))


def test_part_files_of_a_killed_torchrun_are_folded_in_input_order(model_dir, tmp_path, capsys):
    names = _corpus(tmp_path, [50, 7, 130, 20, 90, 33, 64, 5])
    ref = tmp_path / "ref.jsonl"
    assert _classify(model_dir, names, ref) == 0
    want = _lines(ref)
    out = tmp_path / "results.jsonl"
    line = lambda i: (json.dumps(want[i]) + "\n").encode()
    out.write_bytes(line(0) + line(1))
    # Ranks append in their own completion order; one was killed mid-line; input 1 is in both the
    # output and a part file (a crash while folding).
    (tmp_path / "results.jsonl.part-0").write_bytes(line(4) + line(2) + b'{"index": 6, "inp')
    (tmp_path / "results.jsonl.part-1").write_bytes(line(1) + line(5))
    assert _classify(model_dir, names, out) == 0
    assert "3 computed now, 5 from an earlier run" in capsys.readouterr().err   # 3, 6 and 7
    _assert_same_results(_lines(out), want)
    assert not list(tmp_path.glob("results.jsonl.part-*"))


def test_an_output_of_other_inputs_is_refused_and_overwrite_starts_over(model_dir, tmp_path, capsys):
    names = _corpus(tmp_path, [20, 30, 40])
    out = tmp_path / "results.jsonl"
    assert _classify(model_dir, names[:2], out) == 0
    before = out.read_bytes()
    assert _classify(model_dir, [names[1], names[0], names[2]], out) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "doc000.txt" in err
    assert out.read_bytes() == before
    assert _classify(model_dir, [names[1], names[0], names[2]], out, "--overwrite") == 0
    assert [r["input"] for r in _lines(out)] == [names[1], names[0], names[2]]


def test_input_list(model_dir, tmp_path, capsys):
    names = _corpus(tmp_path, [20, 130, 4, 60])
    listing = tmp_path / "inputs.txt"
    listing.write_text(f"{names[1]}\n\n{names[2]}\r\n{names[3]}\n")
    out = tmp_path / "listed.jsonl"
    assert main(["classify", "--model", str(model_dir), "--input", names[0], "--input-list", str(listing),
                 "--output", str(out), "--no-progress"]) == 0
    direct = tmp_path / "direct.jsonl"
    assert _classify(model_dir, names, direct) == 0
    _assert_same_results(_lines(out), _lines(direct))
    assert main(["classify", "--model", str(model_dir), "--input-list", str(tmp_path / "nope.txt")]) == 2
    assert "--input-list" in capsys.readouterr().err


def test_default_model(tmp_path, capsys):
    from rmt_fast.cli_args import default_model_dir

    f = tmp_path / "doc.txt"
    f.write_text("Mary went to the kitchen. John moved to the garden. Where is Mary? " * 20)
    out = tmp_path / "r.jsonl"
    assert main(["classify", "--input", str(f), "--output", str(out), "--no-progress"]) == 0
    d = default_model_dir()
    model = RMTForSequenceClassification.from_pretrained(d)
    want = Engine(model).classify_texts([f.read_text()], load_tokenizer(d))[0]
    (row,) = _lines(out)
    assert row["logits"] == pytest.approx(want.tolist(), abs=1e-5)
    assert row["label"] == model.config.label_names[int(want.argmax())]
