"""The host side after the split (text.py, engine/sources.py, schedule.py, feeder.py): results as they
complete, failures that keep results, cut rules, bounded memory, options and the environment registry."""
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig

from helpers import ASSETS, make_model
from rmt_fast import Engine, SourcesError
from rmt_fast.bench import PeakMemory
from rmt_fast.cli import main
from rmt_fast.engine import RunOptions
from rmt_fast.envvars import ENV_VARS
from rmt_fast.text import collapse_long_words, stream_chunks, text_chunks
from rmt_fast.tokenize import tokenize_long

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = ASSETS   # bert-base-cased's vocabulary and config


pytestmark = pytest.mark.usefixtures("watchdog")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(11)
    bc = BertConfig(vocab_size=28996, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=64, initializer_range=0.2)
    return make_model(bc, num_mem_tokens=4, input_size=40, segment_alignment="left")


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# -- where a text may be cut ---------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "ab\x0bcd ef\x1cgh ij\x85kl " * 5,                        # Python whitespace the tokenizers delete
    "a.b,c;d(e)f [SEP]x[CLS] " * 9 + "\u4e2d\u6587\u3002x\u00bfy",   # punctuation, added tokens, CJK
    "caf\u00e9 e\u0301 . \u0301x" * 7,                          # combining marks after a cut point
])
def test_chunks_give_the_whole_texts_ids(tokenizer, text):
    want = _ids(tokenizer, text)
    for chunk_chars in (1, 2, 5, 13):
        chunks = text_chunks(text, chunk_chars)
        assert "".join(chunks) == text
        assert [i for c in chunks for i in _ids(tokenizer, c)] == want
        pieces = iter([text[i:i + 3] for i in range(0, len(text), 3)])
        streamed = [c for part in stream_chunks(pieces, chunk_chars, 2) for c in part]
        assert [i for c in streamed for i in _ids(tokenizer, c)] == want


def test_long_words_collapse_to_the_same_unk(tokenizer):
    text = "x" * 5000 + " short " + "\u00e9" * 300 + ".abc" + "7" * 101 + "\u4e2d" * 200
    collapsed = collapse_long_words(text, 100)
    assert len(collapsed) < 700 and _ids(tokenizer, collapsed) == _ids(tokenizer, text)
    assert collapse_long_words("y" * 101, 100) == "y" * 101                 # 101 letters: kept as is
    pieces = iter([text[i:i + 64] for i in range(0, len(text), 64)])
    streamed = [c for part in stream_chunks(pieces, 50, 2, max_word_chars=100) for c in part]
    assert [i for c in streamed for i in _ids(tokenizer, c)] == _ids(tokenizer, text)


def test_a_text_without_whitespace_streams_in_bounded_memory(model, tokenizer):
    """20 MB of one word (issue 10, item 12): one [UNK], RSS bounded (the reader once held and rescanned it all)."""
    engine = Engine(model)
    want = engine.classify([[tokenizer.unk_token_id]])
    engine.classify_stream([iter(["warm up the tokenizer copies"])], tokenizer)

    def pieces():
        for _ in range(320):
            yield "x" * 65536
    with PeakMemory("cpu") as mem:
        got = engine.classify_stream([pieces()], tokenizer)
    assert torch.equal(got, want)
    assert mem.peak < 24 * 2**20, f"{mem.peak / 2**20:.1f} MiB"


def test_slots_are_not_allocated_beyond_the_documents(model, tokenizer):
    """A generator with batch_size=20000 (issue 10, item 13): three documents take three slots' memory."""
    engine = Engine(model)
    texts = ["a short text", "another one here", "and a third"]
    want = engine.classify_texts(texts, tokenizer)
    with PeakMemory("cpu") as mem:
        got = engine.classify_stream((iter([t]) for t in texts), tokenizer, batch_size=20_000)
    assert (got - want).abs().max() <= 1e-5
    assert mem.peak < 24 * 2**20, f"{mem.peak / 2**20:.1f} MiB"


# -- results as they complete ----------------------------------------------------------------------

def test_results_come_in_order_before_the_next_documents_compute_ends(model, tokenizer):
    engine = Engine(model)
    texts = ["one short text", "word " * 600, "x", "word " * 300]
    steps, seen, step = [0], [], engine.plan.step

    def counting(*a, **kw):
        steps[0] += 1
        return step(*a, **kw)
    engine.plan.step = counting
    got = engine.classify_texts(texts, tokenizer, batch_size=2,
                                on_result=lambda i, logits, err: seen.append((i, steps[0], logits, err)))
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    assert all(torch.equal(s[2], got[s[0]]) and s[3] is None for s in seen)
    # The short first text is out after its one step, long before the 600-word text's last step.
    assert seen[0][1] == 1 and seen[1][1] > 10 and seen[2][1] <= seen[1][1]


def test_a_failing_sources_iterable_keeps_the_finished_results(model, tokenizer):
    """Issue 10, item 7: the iterable raises after two good documents."""
    engine = Engine(model)
    want = engine.classify_texts(["good one", "good two"], tokenizer)

    def sources():
        yield iter(["good one"])
        yield iter(["good two"])
        raise OSError("the directory listing broke")
    for on_error in ("nan", "raise"):
        with pytest.raises(SourcesError, match="the input sources raised OSError") as e:
            engine.classify_stream(sources(), tokenizer, on_error=on_error, batch_size=4)
        if on_error == "nan":
            assert e.value.results.shape == (2, model.config.num_labels)
            assert (e.value.results - want).abs().max() <= 1e-5
        else:
            assert e.value.results is not None


def test_ctrl_c_is_not_a_document_error(model, tokenizer):
    """A KeyboardInterrupt met while laying out (e.g. on the caller's thread with overlap=False) is raised
    as itself, even with on_error='nan', never turned into a DocumentError or a NaN row."""
    def interrupted():
        yield "some words first "
        raise KeyboardInterrupt
    for overlap in (False, True):
        engine = Engine(model, overlap=overlap)
        with pytest.raises(KeyboardInterrupt):
            engine.classify_stream([interrupted(), iter(["fine"])], tokenizer, on_error="nan")


def test_classify_texts_refuses_one_str(model, tokenizer):
    with pytest.raises(TypeError, match="not one str"):
        Engine(model).classify_texts("abc", tokenizer)


# -- truncation: does more text follow? --------------------------------------------------------------

@pytest.mark.parametrize("tail,cut", [(["[SEP] " * 20], False), ([" " * 200, " " * 200, "more words"], True),
                                      ([], False)])
def test_more_text_follows_is_decided_by_tokens(model, tokenizer, tail, cut):
    """At max_n_segments: a tail of only special tokens is nothing more; whitespace then text is more."""
    import warnings
    import copy
    m = copy.copy(model)
    m.config = model.config.replace(max_n_segments=2)
    S = m.config.segment_size
    words = " ".join(["word"] * (2 * S))                                  # exactly 2 segments of ids
    assert len(tokenize_long(words, tokenizer)) == 2 * S
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Engine(m).classify_stream([iter([words, *tail])], tokenizer, chunk_chars=8)   # many small pieces
    assert any("max_n_segments" in str(w.message) for w in caught) == cut


# -- the command line -----------------------------------------------------------------------------

@pytest.fixture
def model_dir(tmp_path, model):
    d = tmp_path / "model"
    model.save_pretrained(d)
    for f in ("vocab.txt", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json"):
        if (TOKENIZER_DIR / f).is_file():
            (d / f).write_bytes((TOKENIZER_DIR / f).read_bytes())
    return d


def test_closed_stdin_is_a_named_bad_input(model_dir, tmp_path, capsys, monkeypatch):
    good2 = tmp_path / "good2.txt"
    good2.write_text("a fine text")
    monkeypatch.setattr(sys, "stdin", None)
    code = main(["classify", "--model", str(model_dir), "--input", "-", str(good2), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "error: -: OSError: standard input is closed" in err
    assert out.startswith(str(good2) + "\t")


def test_cli_prints_each_result_as_it_completes_and_counts_on_ctrl_c(model_dir, tmp_path):
    """Two files are answered while the third (a pipe) still waits; SIGINT then says 2 of 3 were done."""
    files = []
    for i in range(2):
        files.append(tmp_path / f"f{i}.txt")
        files[-1].write_text("a short text " * (i + 1))
    proc = subprocess.Popen([sys.executable, "-m", "rmt_fast", "classify", "--model", str(model_dir), "--input",
                             *map(str, files), "-", "--no-progress"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            # a background job (nohup, `&`) starts with SIGINT ignored: the child must not
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    import queue
    import threading
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        proc.stdin.write("the pipe has begun but does not end ")
        proc.stdin.flush()
        first = [lines.get(timeout=90), lines.get(timeout=30)]           # out while the pipe is still open
        assert [line.split("\t")[0] for line in first] == [str(f) for f in files]
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)                 # stderr is a few lines: the child cannot block on it
        err = proc.stderr.read()
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted: 2 of 3 documents done" in err


# -- options and environment ------------------------------------------------------------------------

def test_run_options_are_validated_and_keywords_map_onto_them(model, tokenizer):
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        RunOptions(batch_size=0)
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'nan'"):
        RunOptions(on_error="skip")
    with pytest.raises(TypeError, match="unexpected keyword argument.*batchsize"):
        Engine(model).classify_texts(["x"], tokenizer, batchsize=2)
    opts = RunOptions(batch_size=2, on_error="nan")
    assert RunOptions.merge(opts, batch_size=None, workers=3) == RunOptions(batch_size=2, on_error="nan", workers=3)
    engine = Engine(model)
    texts = ["one", "two words", "three more words"]
    assert torch.equal(engine.classify_texts(texts, tokenizer, options=opts),
                       engine.classify_texts(texts, tokenizer, batch_size=2, on_error="nan"))


def test_every_environment_switch_is_registered():
    """Each RMT_FAST_* name read anywhere in the tree is in rmt_fast/envvars.py (which `rmt-fast info` prints)."""
    registered = {v.name for v in ENV_VARS}
    used = set()
    for folder in ("rmt_fast", "kernels", "csrc", "scripts", "benchmarks", "tests"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".sh", ".cpp", ".h", ".cu") and path.is_file():
                used |= set(re.findall(r"(?:environ[^\n]*|getenv[^\n]*|\$\{?)(RMT_FAST_[A-Z0-9_]+)",
                                       path.read_text(errors="replace")))
    used |= set(re.findall(r"environ[^\n]*(RMT_FAST_[A-Z0-9_]+)", (ROOT / "setup.py").read_text()))
    assert used and used <= registered, sorted(used - registered)
    out = subprocess.run([sys.executable, "-m", "rmt_fast", "info"], capture_output=True, text=True).stdout
    assert all(name in out for name in registered)
