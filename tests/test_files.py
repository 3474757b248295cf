"""Crash-safe writes: a kill at any instant of a folder swap leaves one complete copy, found on recovery."""
import os

import pytest

from rmt_fast import files


def make(d, content):
    d.mkdir(parents=True)
    (d / "data").write_text(content)
    (d / "DONE").write_text("")  # written last: marks a complete copy
    return d


def complete(d):
    return (d / "DONE").is_file()


def content(d):
    return (d / "data").read_text()


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no cleanup runs either."""


@pytest.mark.parametrize("kill_at", [1, 2])
def test_a_swap_killed_at_any_rename_recovers_a_complete_copy(tmp_path, monkeypatch, kill_at):
    target = make(tmp_path / "last", "old")
    new = make(files.new_dir_path(target), "new")
    real, calls = os.rename, []

    def rename(a, b):
        calls.append((a, b))
        if len(calls) == kill_at:
            raise Killed
        return real(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(Killed):
        files.replace_dir(new, target)
    monkeypatch.setattr(os, "rename", real)
    message = files.recover_dir(target, complete)
    # Killed before the first rename: the old copy is in place and nothing is said. Killed between the
    # two renames (last/ gone): the new, complete copy is recovered, and the recovery is reported.
    assert content(target) == ("old" if kill_at == 1 else "new")
    assert (message is None) == (kill_at == 1)
    if message:
        assert "recovered it from last.new" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_recovery_ignores_an_incomplete_new_copy(tmp_path):
    target = make(tmp_path / "last", "old")
    half = files.new_dir_path(target)
    half.mkdir()
    (half / "data").write_text("half")  # killed while writing: no DONE
    assert files.recover_dir(target, complete) is None and content(target) == "old" and not half.exists()
    os.rename(target, target.with_name("last.old"))  # killed after moving the old copy away
    half.mkdir()
    assert "from last.old" in files.recover_dir(target, complete) and content(target) == "old"


def test_replace_dir_leaves_only_the_new_copy(tmp_path):
    target = make(tmp_path / "best", "v1")
    files.replace_dir(make(files.new_dir_path(target), "v2"), target)
    files.replace_dir(make(files.new_dir_path(target), "v3"), target)
    assert content(target) == "v3" and sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    f = tmp_path / "accuracy.json"
    files.write_text(f, "complete result")
    with pytest.raises(RuntimeError):
        with files.atomic_path(f) as tmp:
            tmp.write_text("half a res")
            raise RuntimeError("disk full")
    assert f.read_text() == "complete result" and os.listdir(tmp_path) == ["accuracy.json"]
