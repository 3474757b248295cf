"""Resuming a long run (engine/run_checkpoints.py): a run stopped after any save and rerun gives the
uninterrupted run's logits, computes no saved segment again, and refuses files it cannot trust."""
import json
import os
import re
import struct

import pytest
import torch
from helpers import WORDS, oracle, random_docs, save_model_with_vocab, tiny_model
from safetensors import safe_open

from rmt_fast import Engine
from rmt_fast.engine import run_checkpoints
from rmt_fast.engine.run_checkpoints import RunCheckpointError, RunCheckpoints
from rmt_fast.tokenize import load_tokenizer

M_TOKENS, INPUT = 3, 24
S = INPUT - M_TOKENS - 3                                # 18 text ids per segment
LENGTHS = [5 * S + 3, 1, 2 * S + 1, 7 * S, S - 1, 3 * S + 2]    # odd lengths, segment boundaries, mixed


class Crash(Exception):
    """Stands for a kill: raised by the n-th checkpoint write, so the files before it are all there is."""


def model_of(alignment="left", seed=1234, **kw):
    torch.manual_seed(seed)
    return tiny_model(num_mem_tokens=M_TOKENS, input_size=INPUT, segment_alignment=alignment, **kw)


def crash_at(monkeypatch, n):
    """The n-th save (0-based) raises Crash instead of writing."""
    real, count = RunCheckpoints.save, [0]

    def save(self, *args, **kwargs):
        if count[0] == n:
            raise Crash()
        count[0] += 1
        return real(self, *args, **kwargs)
    monkeypatch.setattr(RunCheckpoints, "save", save)


def on_file(directory):
    """{document key: (segments, finished)} of the checkpoint files in ``directory``."""
    out = {}
    for path in directory.glob("doc-*.safetensors"):
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["rmt_fast_run_checkpoint"])
        out[meta["key"]] = (meta["segments"], meta["finished"])
    return out


def count_saves(engine, docs, tmp_path, **kw):
    report = {}         # kept: every queued file is written (a call that removes its folder drops the last ones)
    engine.classify(docs, checkpoint_dir=tmp_path / "count", keep_checkpoints=True, checkpoint_report=report, **kw)
    return report["checkpoints_written"]


def stop_and_rerun(engine, docs, directory, monkeypatch, n, **kw):
    """A run stopped at the n-th save, then rerun: (what was on file, the rerun's logits, its report)."""
    with monkeypatch.context() as m:
        crash_at(m, n)
        with pytest.raises(Crash):
            engine.classify(docs, checkpoint_dir=directory, **kw)
    saved = on_file(directory)
    report = {}
    logits = engine.classify(docs, checkpoint_dir=directory, checkpoint_report=report, **kw)
    return saved, logits, report


def assert_nothing_computed_twice(saved, report, n_docs):
    """Every document with a file resumed from it or was skipped; only the others started fresh."""
    assert report["resumed"] == {d: k for d, (k, done) in saved.items() if not done}
    assert report["finished"] == sorted(d for d, (_, done) in saved.items() if done)
    assert report["fresh"] == sorted(set(range(n_docs)) - set(saved))
    assert report["segments_skipped"] == sum(k for k, _ in saved.values())


@pytest.mark.parametrize("every", [1, 2, 3])
@pytest.mark.parametrize("alignment", ["left", "right", "center"])
@pytest.mark.parametrize("loop", ["compact", "static"])
def test_a_rerun_after_any_save_gives_the_uninterrupted_logits_exactly(every, alignment, loop, tmp_path,
                                                                       monkeypatch):
    """One slot: each step is the same computation in both runs, so the logits are equal bit for bit,
    wherever the first run stopped."""
    model = model_of(alignment)
    engine = Engine(model, dtype="float32")
    engine.static_loop = loop == "static"              # the CUDA loop's code path, on the CPU
    docs = random_docs(LENGTHS, model.config.vocab_size, low=5)
    want = engine.classify(docs, batch_size=1)
    n = count_saves(engine, docs, tmp_path, batch_size=1, checkpoint_every=every)
    mid_way = 0
    for i, stop in enumerate(range(n)):                # stopped at every save in turn
        directory = tmp_path / f"run{i}"
        saved, got, report = stop_and_rerun(engine, docs, directory, monkeypatch, stop, batch_size=1,
                                            checkpoint_every=every)
        assert torch.equal(got, want), (stop, saved)
        assert all(k % every == 0 for k, done in saved.values() if not done), saved   # every N segments
        assert_nothing_computed_twice(saved, report, len(docs))
        assert not directory.exists()                  # removed once the rerun returned
        mid_way += bool(report["resumed"])
    assert mid_way >= 3                                # documents did resume mid-way, not only skip
    for d, doc in enumerate(docs):
        assert torch.allclose(want[d].double(), oracle(model, doc, alignment=alignment).double(), atol=1e-5)


def test_bfloat16_resumes_bit_for_bit(tmp_path, monkeypatch):
    """The file holds the float32 state row the loop carries (bf16 values): nothing is rounded again."""
    engine = Engine(model_of("left"), dtype="bfloat16")
    docs = random_docs(LENGTHS, engine.config.vocab_size, low=5)
    want = engine.classify(docs, batch_size=1)
    n = count_saves(engine, docs, tmp_path, batch_size=1, checkpoint_every=2)
    saved, got, report = stop_and_rerun(engine, docs, tmp_path / "run", monkeypatch, n // 2, batch_size=1,
                                        checkpoint_every=2)
    assert torch.equal(got, want)
    assert report["resumed"]


def test_the_saved_memory_is_the_state_after_its_segment(tmp_path):
    """A file at segment k holds the memory after k segments: Engine.read of those k segments (left)."""
    engine = Engine(model_of("left"), dtype="float32")
    doc = random_docs([4 * S + 5], engine.config.vocab_size, low=5)[0]
    with pytest.raises(Crash):
        with pytest.MonkeyPatch.context() as m:
            crash_at(m, 3)                                 # saves at 1, 2, 3 segments, then the 4th raises
            engine.classify([doc], batch_size=1, checkpoint_dir=tmp_path, checkpoint_every=1)
    with safe_open(str(tmp_path / "doc-0.safetensors"), "pt") as f:
        memory = f.get_tensor("memory")
        assert json.loads(f.metadata()["rmt_fast_run_checkpoint"])["segments"] == 3
    assert torch.equal(memory, engine.read(doc[:3 * S]).memory)


@pytest.mark.parametrize("batch_size", [2, 3])
@pytest.mark.parametrize("loop", ["compact", "static"])
def test_more_documents_than_slots_resume_within_batch_rounding(batch_size, loop, tmp_path, monkeypatch):
    """More documents than slots: a rerun's batch neighbours differ (skipped documents), which moves
    float32 logits by rounding only (1e-6, as any two schedules); the oracle agrees to 1e-5."""
    model = model_of("right")
    engine = Engine(model, dtype="float32")
    engine.static_loop = loop == "static"
    docs = random_docs(LENGTHS + [2 * S, 4 * S - 1], model.config.vocab_size, low=5)
    want = engine.classify(docs, batch_size=batch_size)
    n = count_saves(engine, docs, tmp_path, batch_size=batch_size, checkpoint_every=2)
    saved, got, report = stop_and_rerun(engine, docs, tmp_path / "run", monkeypatch, n // 2,
                                        batch_size=batch_size, checkpoint_every=2)
    assert (got - want).abs().max() <= 1e-6
    assert_nothing_computed_twice(saved, report, len(docs))
    assert report["resumed"] and report["finished"]
    for d, doc in enumerate(docs):
        assert torch.allclose(got[d].double(), oracle(model, doc, alignment="right").double(), atol=1e-5)


@pytest.mark.parametrize("alignment, overlap", [("left", True), ("right", True), ("center", True),
                                                ("left", False)])
def test_texts_resume_where_their_tokens_were_saved(alignment, overlap, tmp_path, monkeypatch):
    """classify_texts: the tokenizer streams each text again; the slot reads past the saved segments
    (on the feeder thread, or in turn on the caller's with overlap=False)."""
    torch.manual_seed(7)
    model, folder = save_model_with_vocab(tmp_path / "model", segment_alignment=alignment)
    tok = load_tokenizer(folder)
    texts = [" ".join(WORDS[j] for j in torch.randint(len(WORDS), (n,)).tolist()) for n in (200, 7, 90, 130)]
    engine = Engine(model, dtype="float32", overlap=overlap)
    want = engine.classify_texts(texts, tok, batch_size=1)
    with monkeypatch.context() as m:
        crash_at(m, 6)
        with pytest.raises(Crash):
            engine.classify_texts(texts, tok, batch_size=1, checkpoint_dir=tmp_path / "ck", checkpoint_every=3)
    saved = on_file(tmp_path / "ck")
    report = {}
    got = engine.classify_texts(texts, tok, batch_size=1, checkpoint_dir=tmp_path / "ck", checkpoint_every=3,
                                checkpoint_report=report)
    assert torch.equal(got, want)
    assert report["resumed"] and report["finished"]
    assert_nothing_computed_twice(saved, report, len(texts))


# -- refusals ------------------------------------------------------------------------------------------

@pytest.fixture
def stopped(tmp_path, monkeypatch):
    """A folder left by a run stopped mid-way (left alignment, float32), with its documents."""
    engine = Engine(model_of("left"), dtype="float32")
    docs = random_docs(LENGTHS, engine.config.vocab_size, low=5)
    with monkeypatch.context() as m:
        crash_at(m, 6)
        with pytest.raises(Crash):
            engine.classify(docs, batch_size=2, checkpoint_dir=tmp_path / "ck", checkpoint_every=1)
    saved = on_file(tmp_path / "ck")
    assert saved
    return engine, docs, tmp_path / "ck", saved


def _refused(engine, docs, directory, *patterns):
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    with pytest.raises(RunCheckpointError) as e:
        engine.classify(docs, batch_size=2, checkpoint_dir=directory, checkpoint_every=1)
    message = str(e.value)
    assert re.search(r"doc-\d+\.safetensors", message), message
    for p in patterns:
        assert re.search(p, message), message
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before      # nothing overwritten
    return message


@pytest.mark.parametrize("what", ["weights", "dtype", "alignment", "memory size"])
def test_a_folder_of_another_model_or_setting_is_refused_naming_the_file(stopped, what):
    engine, docs, directory, _ = stopped
    other = {"weights": lambda: Engine(model_of("left", seed=99), dtype="float32"),
             "dtype": lambda: Engine(model_of("left"), dtype="bfloat16"),
             "alignment": lambda: Engine(model_of("right"), dtype="float32"),
             "memory size": lambda: Engine(tiny_model(num_mem_tokens=M_TOKENS + 1, input_size=INPUT + 1,
                                                      segment_alignment="left"), dtype="float32")}[what]()
    pattern = {"weights": "another model", "dtype": "computed in float32; this run computes in bfloat16",
               "alignment": "alignment differs", "memory size": "memory size differs"}[what]
    _refused(other, docs, directory, pattern)


def test_another_document_under_the_same_index_is_refused(stopped):
    engine, docs, directory, saved = stopped
    d = next(d for d, (k, done) in saved.items() if not done)
    changed = list(docs)
    changed[d] = docs[d].clone()
    changed[d][0] = 5 if int(changed[d][0]) != 5 else 6         # one id in its first segment
    _refused(engine, changed, directory, f"doc-{d}\\.safetensors is for another document", f"document {d}")
    shorter = list(docs)
    k = saved[d][0]
    shorter[d] = docs[d][:k * S]                                 # ends where the file says it went on
    _refused(engine, shorter, directory, "is for another document", f"ends after {k} segments")


def test_a_file_moved_to_another_index_is_refused(stopped):
    engine, docs, directory, saved = stopped
    d = next(iter(saved))
    other = next(i for i in range(len(docs)) if i not in saved)
    os.rename(directory / f"doc-{d}.safetensors", directory / f"doc-{other}.safetensors")
    _refused(engine, docs, directory, f"holds document {d}")


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "wrong shape", "empty", "no fingerprint"])
def test_a_damaged_file_is_an_error_naming_it(stopped, damage):
    engine, docs, directory, saved = stopped
    d = next(d for d, (k, done) in saved.items() if not done)
    path = directory / f"doc-{d}.safetensors"
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "flipped byte":
        path.write_bytes(data[:-5] + bytes([data[-5] ^ 0x40]) + data[-4:])
    else:                       # well-formed files: the memory has one row too many, or a field is missing
        from safetensors.torch import save
        (n,) = struct.unpack("<Q", data[:8])
        meta = json.loads(json.loads(data[8:8 + n])["__metadata__"]["rmt_fast_run_checkpoint"])
        memory = torch.randn(M_TOKENS + 1, 32) if damage == "wrong shape" else torch.randn(M_TOKENS, 32)
        meta["checksum"] = run_checkpoints._checksum(memory)
        if damage == "no fingerprint":
            del meta["fingerprint"]
        path.write_bytes(save({"memory": memory}, metadata={"rmt_fast_run_checkpoint": json.dumps(meta)}))
    pattern = {"truncated": "truncated or corrupt", "empty": "truncated or corrupt",
               "flipped byte": "checksum|truncated or corrupt", "wrong shape": r"memory must be \[3, 32\]",
               "no fingerprint": "metadata lacks fingerprint"}[damage]
    _refused(engine, docs, directory, f"doc-{d}\\.safetensors", pattern)


# -- the folder -------------------------------------------------------------------------------------------

def test_the_folder_is_removed_or_kept_and_other_files_stay(tmp_path):
    engine = Engine(model_of("left"), dtype="float32")
    docs = random_docs([2 * S + 1, 3], engine.config.vocab_size, low=5)
    want = engine.classify(docs)
    assert torch.equal(engine.classify(docs, checkpoint_dir=tmp_path / "a"), want)
    assert not (tmp_path / "a").exists()
    report = {}
    assert torch.equal(engine.classify(docs, checkpoint_dir=tmp_path / "b", keep_checkpoints=True,
                                       checkpoint_report=report), want)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["doc-0.safetensors", "doc-1.safetensors"]
    assert report["kept"] and report["fresh"] == [0, 1]
    (tmp_path / "b" / "notes.txt").write_text("mine")
    report = {}
    assert torch.equal(engine.classify(docs, checkpoint_dir=tmp_path / "b", checkpoint_report=report), want)
    assert report["finished"] == [0, 1] and report["segments_skipped"] == 4
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["notes.txt"]       # only the run's files went


def test_a_failed_run_keeps_its_files_and_reports(tmp_path, monkeypatch):
    engine = Engine(model_of("left"), dtype="float32")
    docs = random_docs([3 * S, 2 * S], engine.config.vocab_size, low=5)
    report = {}
    with monkeypatch.context() as m:
        crash_at(m, 2)
        with pytest.raises(Crash):
            engine.classify(docs, batch_size=1, checkpoint_dir=tmp_path, checkpoint_every=1, checkpoint_report=report)
    assert report["kept"] and report["checkpoints_written"] == 2 and len(on_file(tmp_path)) == 1


def test_every_checkpoint_is_written_to_a_temporary_file_fsynced_then_renamed(tmp_path, monkeypatch):
    from rmt_fast import files
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)
    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    engine = Engine(model_of("left"), dtype="float32")
    docs = random_docs([3 * S + 1, S], engine.config.vocab_size, low=5)
    engine.classify(docs, checkpoint_dir=tmp_path / "ck", checkpoint_every=1, keep_checkpoints=True)
    renames = [e for e in events if e[0] == "replace"]
    assert len(renames) == 3 + 1 + 1                                   # 3 memories + 2 logits
    for e in renames:
        assert re.search(r"/doc-\d\.safetensors$", e[2]) and os.path.basename(e[1]).startswith(".doc-")
        i = events.index(e)
        assert ("fsync", e[1]) in events[:i]                           # the data is on disk before the rename
        assert events[i + 1] == ("fsync", str(tmp_path / "ck"))        # and the rename itself after


def test_options_are_checked_before_any_compute(tmp_path):
    engine = Engine(model_of("left"), dtype="float32")
    docs = random_docs([5], engine.config.vocab_size, low=5)
    for kwargs, pattern in [({"checkpoint_dir": tmp_path, "checkpoint_every": 0}, "checkpoint_every must be"),
                            ({"checkpoint_every": 3}, "need checkpoint_dir"),
                            ({"keep_checkpoints": True}, "need checkpoint_dir"),
                            ({"checkpoint_dir": tmp_path, "per_segment": True}, "per_segment=True cannot")]:
        with pytest.raises(ValueError, match=pattern):
            engine.classify(docs, **kwargs)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunCheckpointError, match="exists and is not a folder"):
        engine.classify(docs, checkpoint_dir=tmp_path / "file")
    with pytest.raises(ValueError, match="checkpoint_every must be"):
        engine.classify_texts(["a"], None, checkpoint_dir=tmp_path, checkpoint_every=-1)


def test_a_write_error_stops_the_run_and_no_writer_thread_outlives_it(tmp_path, monkeypatch):
    import threading
    from rmt_fast import files

    def full(path, data):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(files, "write_bytes", full)
    engine = Engine(model_of("left"), dtype="float32")
    docs = random_docs([6 * S, 5 * S], engine.config.vocab_size, low=5)
    with pytest.raises(RunCheckpointError, match=r"could not be written \(OSError: .*No space left on device"):
        engine.classify(docs, batch_size=1, checkpoint_dir=tmp_path / "ck", checkpoint_every=1)
    assert not [t for t in threading.enumerate() if t.name == "rmt-checkpoints"]
    engine.classify(docs, batch_size=1)                # the engine itself is fine


def test_checkpoint_keys_name_the_files_and_must_be_distinct(tmp_path):
    torch.manual_seed(5)
    model, folder = save_model_with_vocab(tmp_path / "model")
    tok = load_tokenizer(folder)
    engine = Engine(model, dtype="float32")
    texts = ["the cat sat on the mat " * 9, "a dog ran far away"]
    for i, t in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(t)
    paths = [tmp_path / "0.txt", tmp_path / "1.txt"]
    want = engine.classify_stream(paths, tok)
    got = engine.classify_stream(paths, tok, checkpoint_dir=tmp_path / "ck", keep_checkpoints=True,
                                 checkpoint_keys=[7, 3])
    assert torch.equal(got, want)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["doc-3.safetensors", "doc-7.safetensors"]
    with pytest.raises(RunCheckpointError, match="checkpoint_keys must be distinct"):
        engine.classify_stream(paths, tok, checkpoint_dir=tmp_path / "ck", checkpoint_keys=[4, 4])
