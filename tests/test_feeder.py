"""The feeder against the synchronous path: the same segments, in order; errors named; no hangs.

Every test runs under a watchdog (faulthandler): a hang fails the run with every thread's stack
instead of blocking it.
"""
import gzip
import io
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import BertConfig

from helpers import ASSETS, make_model, oracle, random_docs
from rmt_fast import Engine, RMTConfig, segmentation
from rmt_fast.engine.feeder import Feeder
from rmt_fast.engine.schedule import ChunkLayout
from rmt_fast.engine.sources import DocumentError, IdsSource, TextSource
from rmt_fast.engine.steprows import BUSY, DEST, KEY_LEN, RESET, SLOT
from rmt_fast.text import stream_chunks
from lpt_schedule import make_schedule
from rmt_fast.tokenize import tokenize_long

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = ASSETS   # bert-base-cased's vocabulary and config


pytestmark = pytest.mark.usefixtures("watchdog")


@pytest.fixture(scope="module")
def novel():
    with gzip.open(ROOT / "rmt_fast" / "data" / "noise" / "persuasion.txt.gz", "rt", encoding="utf-8") as f:
        return f.read()[:60_000]


def _texts(novel, n, seed=0, max_chars=3000):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        a = int(torch.randint(0, len(novel) - max_chars, (1,), generator=g))
        top = max_chars if i % 7 else 40
        k = int(torch.randint(0, top, (1,), generator=g))
        out.append(novel[a:a + k])
    return out


def _feeder_threads():
    return [t for t in threading.enumerate() if t.name.startswith(("rmt-feeder", "rmt-tokenize"))]


def _wait_threads_gone(timeout=10.0):
    deadline = time.monotonic() + timeout
    while _feeder_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    return _feeder_threads()


def collect(source, cfg, slots, steps, threaded, empty="special"):
    """Run a feeder to the end: per document, its rows [n, T] and key lengths, plus sanity of the aux columns."""
    layout = ChunkLayout(source, cfg, slots, steps, ring=3, empty=empty)
    T = cfg.input_size
    per_doc, table = {}, []
    with Feeder(layout, "cpu", threaded=threaded) as feed:
        current = [None] * slots
        for chunk, ids, meta in feed:
            started = list(chunk.started)
            for c in range(chunk.steps):
                width, row_docs, n_busy = chunk.width[c], [-1] * slots, 0
                for pos in range(width):
                    r, f = ids[c, pos], meta[c, :, pos]
                    if not f[BUSY]:
                        assert int(f[DEST]) == layout.sink and not f[RESET]
                        assert int(f[SLOT]) == -1
                        continue
                    assert pos == n_busy                                    # busy rows first
                    n_busy += 1
                    b = int(f[SLOT])
                    if f[RESET]:
                        current[b] = started.pop(0)
                        assert current[b] not in per_doc
                        per_doc[current[b]] = []
                    d = current[b]
                    per_doc[d].append((r.clone(), int(f[KEY_LEN]), int(f[DEST])))
                    assert row_docs[b] == -1
                    row_docs[b] = d
                    if chunk.masked[c] is False:
                        assert int(f[KEY_LEN]) == T
                # The width is the busy count rounded up to a power of two (or all slots).
                assert width == slots or (width >= n_busy > width // 2 and width & (width - 1) == 0)
                assert chunk.n_busy[c] == n_busy
                table.append(row_docs)
            feed.release(chunk)
    return per_doc, table, layout


def _check_against_sync(per_doc, documents, cfg, sink):
    segs = segmentation.cut(documents, cfg, empty_as_one_segment=True)
    assert sorted(per_doc) == list(range(len(documents)))
    for d in range(len(documents)):
        sel = (segs.doc == d).nonzero().flatten()
        want = segmentation.layout(documents.tokens, segs.start[sel], segs.length[sel], cfg)
        want_kl = segmentation.key_lengths(segs.length[sel], cfg)
        got = per_doc[d]
        assert len(got) == len(sel), f"document {d}: {len(got)} segments, want {len(sel)}"
        assert torch.equal(torch.stack([g[0] for g in got]), want), f"document {d}"
        assert [g[1] for g in got] == want_kl.tolist()
        assert [g[2] != sink for g in got] == [False] * (len(sel) - 1) + [True]


@pytest.mark.parametrize("alignment", ["right", "left", "center"])
@pytest.mark.parametrize("threaded", [True, False])
def test_ids_feeder_yields_the_synchronous_segments(alignment, threaded):
    cfg = RMTConfig(vocab_size=60, num_mem_tokens=3, input_size=24, cls_token_id=1, sep_token_id=2,
                    pad_token_id=0, segment_alignment=alignment)
    lengths = [0, 1, 17, 18, 19, 36, 37, 200, 5, 1000, 3, 18 * 7, 90] * 3
    docs = [torch.cat([d, torch.tensor([0, 2])]) for d in random_docs(lengths, 60, low=3)]  # specials dropped
    documents = segmentation.clean_and_truncate(docs, cfg)
    segs = segmentation.cut(documents, cfg, empty_as_one_segment=True)
    for slots, steps in ((1, 8), (4, 8), (7, 3)):
        per_doc, table, layout = collect(IdsSource(documents, segs), cfg, slots, steps, threaded)
        _check_against_sync(per_doc, documents, cfg, layout.sink)
        # Longest-first, lowest free slot first: exactly the LPT schedule of tests/lpt_schedule.py.
        sched = make_schedule(segs, slots)
        want_docs = torch.where(sched.table >= 0, segs.doc[sched.table.clamp(min=0)], -1)
        assert torch.equal(torch.tensor(table), want_docs)


@pytest.mark.parametrize("alignment,chunk_chars", [("left", 50), ("right", 300), ("center", 1 << 16)])
def test_text_feeder_yields_the_synchronous_segments(tokenizer, novel, alignment, chunk_chars):
    cfg = RMTConfig(vocab_size=28996, num_mem_tokens=3, input_size=24, segment_alignment=alignment)
    texts = _texts(novel, 30) + ["[SEP] a [CLS] b [PAD]", "", " \n "]
    ids = [tokenize_long(t, tokenizer) for t in texts]
    documents = segmentation.clean_and_truncate(ids, cfg)
    for slots in (1, 5):
        source = TextSource(((None, t) for t in texts), tokenizer, cfg, empty="special", workers=2,
                            lookahead=3, chunk_chars=chunk_chars, chunks_per_piece=2, pieces_buffered=1)
        per_doc, _, layout = collect(source, cfg, slots, 4, threaded=True)
        _check_against_sync(per_doc, documents, cfg, layout.sink)
    assert not _wait_threads_gone()


def test_stream_chunks_cut_anywhere_in_bytes(novel, tokenizer):
    """Bytes split at every kind of position (inside UTF-8 characters too) give the text's exact ids."""
    text = "\ufeff" + novel[:4000] + " na\u0308ive caf\u00e9 \u4e2d\u6587 end"
    data = text.encode("utf-8")
    pieces = [data[i:i + 37] for i in range(0, len(data), 37)]
    chunks = [c for piece in stream_chunks(iter(pieces), 100, 3) for c in piece]
    assert "".join(chunks) == text[1:]                                   # the BOM is dropped
    whole = tokenizer(text[1:], add_special_tokens=False)["input_ids"]
    parts = [i for c in chunks for i in tokenizer(c, add_special_tokens=False)["input_ids"]]
    assert parts == whole
    with pytest.raises(ValueError, match="not valid UTF-8 at byte 5"):
        list(stream_chunks(iter([b"ok ", b"\xc3\xa9\xff bad"]), 100, 3))


class _Flaky:
    """A tokenizer that fails on texts holding BOOM (and counts calls)."""

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, chunks, **kw):
        if any("BOOM" in c for c in chunks):
            raise RuntimeError("tokenizer exploded")
        return self.tok(chunks, **kw)


def test_tokenizer_error_reaches_the_caller_named(tokenizer, novel):
    texts = _texts(novel, 12, max_chars=500)
    texts[7] = texts[7] + " BOOM"
    cfg = RMTConfig(vocab_size=28996, num_mem_tokens=3, input_size=24)
    source = TextSource(((f"doc-{i}", t) for i, t in enumerate(texts)), _Flaky(tokenizer), cfg, lookahead=2)
    with pytest.raises(DocumentError, match="doc-7.*tokenizer exploded") as e:
        collect(source, cfg, 3, 4, threaded=True)
    assert e.value.index == 7 and list(e.value.problems) == [7]
    assert isinstance(e.value.__cause__, RuntimeError)
    assert not _wait_threads_gone()


def test_early_exit_stops_every_thread(tokenizer, novel):
    cfg = RMTConfig(vocab_size=28996, num_mem_tokens=3, input_size=24, segment_alignment="left")
    texts = (novel for _ in range(10_000))                                # far more than will be read
    source = TextSource(((None, t) for t in texts), tokenizer, cfg, lookahead=4, chunk_chars=500)
    layout = ChunkLayout(source, cfg, 4, 4, ring=3)
    with pytest.raises(ZeroDivisionError):
        with Feeder(layout, "cpu") as feed:
            for i, (chunk, _, _) in enumerate(feed):
                assert _feeder_threads()
                if i == 2:
                    1 / 0                                               # the consumer fails mid-run
                feed.release(chunk)
    assert not _wait_threads_gone()


def test_stream_is_read_lazily_and_in_bounded_memory(tokenizer, novel):
    """A left-aligned stream of 2000 pieces: the first chunk comes after a few pieces, not all."""
    cfg = RMTConfig(vocab_size=28996, num_mem_tokens=3, input_size=24, segment_alignment="left")
    consumed = [0]

    def pieces():
        for i in range(2000):
            consumed[0] += 1
            yield novel[(i * 997) % 50_000:(i * 997) % 50_000 + 500] + " "

    source = TextSource([("pipe", pieces())], tokenizer, cfg, chunk_chars=500, chunks_per_piece=2, pieces_buffered=2)
    layout = ChunkLayout(source, cfg, 1, 4, ring=2)
    with Feeder(layout, "cpu") as feed:
        chunk, _, _ = next(feed)
        feed.release(chunk)
        time.sleep(0.3)                                                 # let the workers run ahead
        assert consumed[0] < 40, consumed[0]
    assert not _wait_threads_gone()


# -- the Engine through the feeder ------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_model():
    """A small BERT over bert-base-cased's vocabulary (so real tokenized text can be classified)."""
    torch.manual_seed(7)
    bc = BertConfig(vocab_size=28996, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=64, initializer_range=0.2)
    return make_model(bc, num_mem_tokens=4, input_size=40)


def _with_alignment(model, alignment):
    import copy
    m = copy.copy(model)
    m.config = model.config.replace(segment_alignment=alignment)
    return m


@pytest.mark.parametrize("alignment", ["right", "left"])
def test_classify_texts_matches_oracle(text_model, tokenizer, novel, alignment):
    model = _with_alignment(text_model, alignment)
    texts = _texts(novel, 9, seed=3, max_chars=1500)
    texts[0] = "x"
    got = Engine(model).classify_texts(texts, tokenizer, batch_size=3, chunk_chars=300)
    want = torch.stack([oracle(model, tokenize_long(t, tokenizer), alignment=alignment) for t in texts])
    assert got.dtype == torch.float32 and (got.double() - want).abs().max() <= 1e-4
    assert want.std(0).max() > 1e-2


@pytest.mark.parametrize("alignment", ["left", "right", "center"])
def test_streaming_equals_non_streaming(text_model, tokenizer, novel, tmp_path, alignment):
    model = _with_alignment(text_model, alignment)
    texts = _texts(novel, 6, seed=5, max_chars=8000)
    paths = []
    for i, t in enumerate(texts):
        p = tmp_path / f"t{i}.txt"
        p.write_text(t, encoding="utf-8")
        paths.append(p)
    engine = Engine(model)
    ids = [tokenize_long(t, tokenizer) for t in texts]
    # Texts take slots in input order, ids longest first: other batch neighbours, so not bit-equal.
    assert (engine.classify(ids, batch_size=2) - engine.classify(ids, batch_size=1)).abs().max() <= 1e-5
    want = engine.classify_texts(texts, tokenizer, batch_size=2)
    assert (want - engine.classify(ids, batch_size=2)).abs().max() <= 1e-5
    assert torch.equal(engine.classify_files(paths, tokenizer, batch_size=2, chunk_chars=256), want)
    # A stream's slot sits a step out while its ids are late, so its batch neighbours depend on timing.
    pipes = [io.BytesIO(t.encode("utf-8")) for t in texts]                # file objects, like a pipe
    assert (engine.classify_stream(pipes, tokenizer, batch_size=2, chunk_chars=100) - want).abs().max() <= 1e-5


def test_stream_errors_empty_and_nan_mode(text_model, tokenizer, tmp_path):
    model = _with_alignment(text_model, "left")
    engine = Engine(model)
    good = tmp_path / "good.txt"
    good.write_text("a perfectly fine text " * 30)
    (tmp_path / "empty.txt").write_text("  \n")
    missing = tmp_path / "missing.txt"
    with pytest.raises(DocumentError, match="missing.txt.*FileNotFoundError"):
        engine.classify_files([good, missing], tokenizer)
    with pytest.raises(DocumentError, match="empty.txt.*empty document"):
        engine.classify_files([good, tmp_path / "empty.txt"], tokenizer)
    with pytest.warns(RuntimeWarning, match="document 1 gets NaN logits"):
        got = engine.classify_files([good, missing, good], tokenizer, on_error="nan")
    assert torch.isnan(got[1]).all() and torch.equal(got[0], got[2]) and torch.isfinite(got[0]).all()
    special = engine.classify_files([tmp_path / "empty.txt"], tokenizer, empty="special")
    assert torch.equal(special, engine.classify([[]], empty="special"))
    assert not _wait_threads_gone()


def test_stream_truncation_warns_and_keeps_head(text_model, tokenizer, novel):
    model = _with_alignment(text_model, "left")
    model.config = model.config.replace(max_n_segments=3)
    text = novel[:3000]
    engine = Engine(model)
    with pytest.warns(UserWarning, match="max_n_segments"):
        want = engine.classify([tokenize_long(text, tokenizer)])
    with pytest.warns(UserWarning, match="max_n_segments"):
        got = engine.classify_stream([iter([text[i:i + 100] for i in range(0, 3000, 100)])], tokenizer,
                                     chunk_chars=64)
    assert torch.equal(got, want)


def test_keyboard_interrupt_stops_the_run_promptly(text_model, tokenizer, novel):
    model = _with_alignment(text_model, "left")
    engine = Engine(model)
    calls = [0]
    step = engine.plan.step

    def interrupted(*a, **kw):
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt
        return step(*a, **kw)

    engine.plan.step = interrupted
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        engine.classify_texts([novel] * 50, tokenizer, batch_size=2, progress=True)
    assert time.monotonic() - t0 < 30
    assert not _wait_threads_gone()
    engine.plan.step = step
    got = engine.classify_texts(["short text"], tokenizer)                 # the engine still works after
    assert torch.isfinite(got).all()


def test_progress_reports_rates(text_model, tokenizer, novel, capsys):
    Engine(text_model).classify_texts([novel[:5000]], tokenizer, progress=True)
    err = capsys.readouterr().err
    assert "seg/s" in err and "tok/s" in err


def test_small_pieces_do_not_stall_a_wide_segment(tokenizer, novel):
    """Pieces far smaller than a segment (499 tokens): the tokenizer must not pause below S + 1 tokens."""
    cfg = RMTConfig(vocab_size=28996, num_mem_tokens=10, input_size=512, segment_alignment="left")
    texts = [novel[:12_000], novel[20_000:21_000]]
    documents = segmentation.clean_and_truncate([tokenize_long(t, tokenizer) for t in texts], cfg)
    source = TextSource(((None, t) for t in texts), tokenizer, cfg, chunk_chars=64, chunks_per_piece=1,
                        pieces_buffered=1)
    per_doc, _, layout = collect(source, cfg, 2, 4, threaded=True)
    _check_against_sync(per_doc, documents, cfg, layout.sink)


def test_one_source_instead_of_a_list_is_refused(text_model, tokenizer):
    with pytest.raises(TypeError, match="iterable of documents"):
        Engine(text_model).classify_stream("some/file.txt", tokenizer)


def test_bad_bytes_are_named_with_their_offset(text_model, tokenizer, tmp_path):
    """The CLI's wording: "not valid UTF-8 at byte N", N counted from the start of the file (BOM included)."""
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"\xef\xbb\xbf" + b"caf\xc3\xa9 " * 3000 + b"caf\xe9")
    failures = {}
    got = Engine(_with_alignment(text_model, "left")).classify_files(
        [bad], tokenizer, on_error="nan", failures=failures, chunk_chars=64)
    assert torch.isnan(got).all()
    assert failures == {0: "not valid UTF-8 at byte 18006 (b'\\xe9'); re-encode it or pass errors='replace'"}
    fixed = Engine(_with_alignment(text_model, "left")).classify_files([bad], tokenizer, errors="replace")
    assert torch.isfinite(fixed).all()


def test_real_ctrl_c_ends_the_process_promptly(tmp_path):
    """SIGINT to a process in the middle of a long streamed run: KeyboardInterrupt, then a clean exit."""
    import os
    import signal
    import subprocess
    import sys
    script = tmp_path / "run.py"
    script.write_text(f"""
import sys, torch
sys.path.insert(0, {str(ROOT / 'tests')!r})
from transformers import BertConfig
from helpers import make_model
from rmt_fast import Engine
from rmt_fast.tokenize import load_tokenizer
tok = load_tokenizer({str(TOKENIZER_DIR)!r})
bc = BertConfig(vocab_size=28996, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=64)
engine = Engine(make_model(bc, num_mem_tokens=4, input_size=40, segment_alignment="left"))
def endless():
    while True:
        yield "many words in a text that never ends " * 100
print("ready", flush=True)
try:
    engine.classify_stream([endless()], tok, progress=False)
except KeyboardInterrupt:
    import threading
    left = [t.name for t in threading.enumerate() if t.name.startswith(("rmt-feeder", "rmt-tokenize"))]
    print("interrupted; threads left:", left, flush=True)
    raise SystemExit(130)
""")
    # preexec_fn: a shell's background job (nohup, `&`, some CI runners) starts with SIGINT ignored, which
    # the child would inherit, and Python then installs no KeyboardInterrupt handler
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(2.0)                                             # well inside the run
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted; threads left: []" in out


def test_a_slow_stream_hands_over_the_segments_it_has(tokenizer, novel):
    """A pipe that stalls: the chunk ends early with the segments already there, rather than waiting."""
    cfg = RMTConfig(vocab_size=28996, num_mem_tokens=3, input_size=24, segment_alignment="left")
    gate = threading.Event()

    def pieces():
        yield novel[:3000]
        gate.wait(20)
        yield novel[3000:6000]

    source = TextSource([("pipe", pieces())], tokenizer, cfg, chunk_chars=500, chunks_per_piece=2)
    layout = ChunkLayout(source, cfg, 1, 64, ring=2)
    with Feeder(layout, "cpu") as feed:
        t0 = time.monotonic()
        chunk, _, _ = next(feed)
        assert time.monotonic() - t0 < 10 and not gate.is_set()
        assert 0 < chunk.steps < 64 and not chunk.finished
        feed.release(chunk)
        gate.set()
        steps = chunk.steps + sum(c.steps for c in _released(feed))
    ids = tokenize_long(novel[:6000], tokenizer)
    assert steps == -(-len(ids) // cfg.segment_size)


def _released(feed):
    for chunk, _, _ in feed:
        feed.release(chunk)
        yield chunk
