"""``rmt-fast classify --checkpoint-dir``: the flags, the summary, and a process killed with SIGKILL
mid-document then rerun: the same logits, and no document computed twice from its start."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import WORDS, save_model_with_vocab
from safetensors import safe_open

from rmt_fast.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def model_dir(tmp_path):
    torch.manual_seed(3)
    return save_model_with_vocab(tmp_path / "model")[1]


def _corpus(tmp_path, lengths):
    folder = tmp_path / "docs"
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, n in enumerate(lengths):
        f = folder / f"doc{i}.txt"
        f.write_text(" ".join(WORDS[j] for j in torch.randint(len(WORDS), (n,)).tolist()), encoding="utf-8")
        names.append(str(f))
    return names


def _classify(model_dir, names, *extra):
    return main(["classify", "--model", str(model_dir), "--input", *names, "--no-progress", "--json", *extra])


def _on_file(directory):
    """{key: (segments, finished)} of the checkpoint files in ``directory``."""
    out = {}
    for path in Path(directory).glob("doc-*.safetensors"):
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["rmt_fast_run_checkpoint"])
        out[meta["key"]] = (meta["segments"], meta["finished"])
    return out


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint-every", "0"], "argument --checkpoint-every: must be a positive integer, got '0'"),
    (["--checkpoint-every", "x"], "argument --checkpoint-every: must be a positive integer, got 'x'"),
])
def test_a_bad_checkpoint_every_is_refused_at_parse_time(model_dir, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        _classify(model_dir, ["x.txt"], "--checkpoint-dir", str(tmp_path / "ck"), *argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_checkpoint_flags_are_checked_before_any_compute(model_dir, tmp_path, capsys):
    names = _corpus(tmp_path, [30])
    assert _classify(model_dir, names, "--checkpoint-every", "3") == 2
    assert "error: --checkpoint-every and --keep-checkpoints need --checkpoint-dir" in capsys.readouterr().err
    assert _classify(model_dir, names, "--keep-checkpoints") == 2
    assert "need --checkpoint-dir" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert _classify(model_dir, names, "--checkpoint-dir", str(tmp_path / "file")) == 2
    out = capsys.readouterr()
    assert f"error: --checkpoint-dir {tmp_path / 'file'}: exists and is not a folder" in out.err and not out.out


def test_keep_then_rerun_skips_finished_documents_and_removes_the_folder(model_dir, tmp_path, capsys):
    names = _corpus(tmp_path, [100, 7, 60])
    assert _classify(model_dir, names) == 0
    want = capsys.readouterr().out
    ck = tmp_path / "ck"
    assert _classify(model_dir, names, "--checkpoint-dir", str(ck), "--checkpoint-every", "2",
                     "--keep-checkpoints", "--batch-size", "2") == 0
    out = capsys.readouterr()
    assert out.out == want
    assert "0 documents resumed, 0 skipped as finished, 3 started fresh, 0 segments skipped" in out.err
    assert f"{ck} kept" in out.err and _on_file(ck) == {0: (6, True), 1: (1, True), 2: (4, True)}
    assert _classify(model_dir, names, "--checkpoint-dir", str(ck), "--batch-size", "2") == 0
    out = capsys.readouterr()
    assert out.out == want                             # the saved logits, printed as computed ones
    assert "3 skipped as finished, 0 started fresh, 11 segments skipped; 0 files written" in out.err
    assert f"{ck} removed" in out.err and not ck.exists()


def test_a_wrong_folder_is_one_error_line_naming_the_file(model_dir, tmp_path, capsys):
    names = _corpus(tmp_path, [40, 50])
    ck = tmp_path / "ck"
    assert _classify(model_dir, names, "--checkpoint-dir", str(ck), "--keep-checkpoints") == 0
    capsys.readouterr()
    other = _corpus(tmp_path / "other", [40, 50])
    assert _classify(model_dir, other, "--checkpoint-dir", str(ck)) == 2
    err = capsys.readouterr().err
    assert re.search(r"error: .*doc-[01]\.safetensors is for another document", err), err


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT / "tests"))


def test_killed_with_sigkill_mid_document_then_rerun_resumes(model_dir, tmp_path, capsys):
    """One slot, long documents: the kill lands inside a document. The rerun (with --output, which
    answers the documents finished before the kill) resumes it from its file; the logits equal the
    uninterrupted run's bit for bit, and only documents without a file start from segment 0."""
    names = _corpus(tmp_path, [3000, 40, 8000, 2600])
    ref = tmp_path / "ref.jsonl"
    assert main(["classify", "--model", str(model_dir), "--input", *names, "--output", str(ref), "--no-progress",
                 "--batch-size", "1"]) == 0
    out, ck = tmp_path / "out.jsonl", tmp_path / "ck"
    cmd = [sys.executable, "-m", "rmt_fast", "classify", "--model", str(model_dir), "--input", *names,
           "--output", str(out), "--no-progress", "--batch-size", "1", "--checkpoint-dir", str(ck),
           "--checkpoint-every", "5"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        saved = _on_file(ck) if ck.exists() else {}
        if saved.get(0, (0, False))[1] and saved.get(2, (0, False))[0] >= 10:   # inside document 2
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    saved = _on_file(ck)
    assert saved.get(2, (0, True))[1] is False and saved[2][0] >= 10, (saved, err.decode()[-2000:])
    answered = len(out.read_text().splitlines()) if out.exists() else 0
    capsys.readouterr()
    assert main(cmd[3:]) == 0                          # the same command, in this process
    err = capsys.readouterr().err
    unfinished = {k: s for k, (s, done) in saved.items() if not done}
    assert f"{len(unfinished)} document{'' if len(unfinished) == 1 else 's'} resumed" in err, err
    for k, s in unfinished.items():
        assert f"{names[k]} at segment {s}" in err
    fresh = [k for k in range(answered, len(names)) if k not in saved]
    assert f"{len(fresh)} started fresh" in err, err
    got, want = [json.loads(x) for x in out.read_text().splitlines()], [json.loads(x) for x in ref.read_text().splitlines()]
    assert [r["input"] for r in got] == names
    assert [r["logits"] for r in got] == [r["logits"] for r in want]
    assert not ck.exists()


def test_summary_counts_read_as_english():
    from rmt_fast.engine.run_checkpoints import summary
    report = {"resumed": {4: 128}, "finished": [1, 2], "fresh": [], "segments_skipped": 1,
              "checkpoints_written": 1, "directory": "ck", "kept": True}
    line = summary(report, name_of=lambda i: f"doc{i}")
    assert line == ("checkpoints: 1 document resumed (doc4 at segment 128), 2 skipped as finished, 0 started "
                    "fresh, 1 segment skipped; 1 file written; ck kept")
    report.update(resumed={}, segments_skipped=0, checkpoints_written=2, kept=False)
    assert "0 documents resumed, 2 skipped as finished, 0 started fresh, 0 segments skipped; 2 files written; " \
           "ck removed" in summary(report)
