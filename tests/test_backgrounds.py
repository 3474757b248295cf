"""Background text of several kinds: every source in one split, the held-out kind in no other split,
no sentence naming the tasks' people or places, the same corpus and samples on every build."""
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from rmt_fast.config import RMTConfig
from rmt_fast import tasks as T

BERT_CASED = Path(__file__).resolve().parents[1] / "rmt_fast" / "data" / "bert-base-cased"


@pytest.fixture(scope="module")
def tok():
    return T.load_tokenizer(BERT_CASED)


def test_every_source_shipped_in_one_split_and_one_kind():
    in_splits = [s for srcs in T.SPLITS.values() for s in srcs]
    in_kinds = [s for srcs in T.KINDS.values() for s in srcs]
    assert len(in_splits) == len(set(in_splits)) and len(in_kinds) == len(set(in_kinds))
    assert set(in_splits) == set(in_kinds) == {p.name[:-len(".txt.gz")] for p in T.noise_dir().glob("*.txt.gz")}
    kind_of = {s: k for k, srcs in T.KINDS.items() for s in srcs}
    kinds = {split: {kind_of[s] for s in srcs} for split, srcs in T.SPLITS.items()}
    assert kinds["train"] >= {"novel", "drama"}                          # more than one author's style
    held = kinds["heldout"]
    assert held and not held & (kinds["train"] | kinds["validation"] | kinds["test"])


def _sentences(corpus, limit=None):
    n = len(corpus.length) if limit is None else min(limit, len(corpus.length))
    return {tuple(corpus.tokens[s:s + k]) for s, k in zip(corpus.start[:n], corpus.length[:n]) if k > 10}


def test_splits_share_no_sentence(tok):
    sents = {split: _sentences(T._corpus(split, tok)) for split in T.SPLITS}
    for a in T.SPLITS:
        for b in T.SPLITS:
            if a < b:
                shared = sents[a] & sents[b]
                # Set phrases recur across works ("Amen." is short and dropped above); a few long ones may
                # too, but never a real share of a split.
                assert len(shared) <= 0.002 * min(len(sents[a]), len(sents[b])), (a, b, len(shared))


@pytest.mark.parametrize("split", list(T.SPLITS))
def test_filter_drops_every_sentence_naming_a_place_or_person(tok, split):
    c = T._corpus(split, tok)
    text = tok.decode(c.tokens)
    assert T._ENTITY.search(text) is None, text[max(0, T._ENTITY.search(text).start() - 80):][:160]
    # ...and it had work to do: the raw texts do name them.
    raw = " ".join(gzip.open(T.noise_dir() / f"{s}.txt.gz", "rt", encoding="utf-8").read()
                   for s in T.SPLITS[split])
    assert len(T._ENTITY.findall(raw)) >= 20


def test_heldout_samples_come_from_the_heldout_kind(tok):
    cfg = T.task_config(RMTConfig(vocab_size=len(tok), input_size=64))
    s = T.TaskGenerator("detect", tok, cfg, split="heldout", seed=0).sample(6, 1)
    a, b = s.fact_spans[0]
    piece = tok.decode(s.input_ids[b:b + 12] if b + 12 <= s.question_span[0] else s.input_ids[a - 12:a])
    heldout = " ".join(tok.decode(T._corpus("heldout", tok).tokens).split())
    assert " ".join(piece.split()[1:-1]) in heldout
    for split in ("train", "validation", "test"):
        assert " ".join(piece.split()[1:-1]) not in " ".join(tok.decode(T._corpus(split, tok).tokens).split())


def test_corpus_and_samples_the_same_on_every_build(tok, tmp_path, monkeypatch):
    cfg = T.task_config(RMTConfig(vocab_size=len(tok), input_size=64))
    first = T.TaskGenerator(("memorize", "detect", "reasoning"), tok, cfg, split="heldout", seed=2)
    want = [first.sample(3, i) for i in range(6)]
    # A fresh build from the texts, then a read back from the disk cache, give the same arrays and samples.
    monkeypatch.setattr(T, "_CORPUS_CACHE", {})
    monkeypatch.setenv("RMT_FAST_CACHE", str(tmp_path))
    built = T._corpus("heldout", tok)
    monkeypatch.setattr(T, "_CORPUS_CACHE", {})
    cached = T._corpus("heldout", tok)
    assert list(tmp_path.glob("corpus-*heldout*.npz"))
    for field in ("tokens", "start", "length", "boundary"):
        assert np.array_equal(getattr(built, field), getattr(cached, field))
        assert np.array_equal(getattr(built, field), getattr(first.corpus, field))
    again = T.TaskGenerator(("memorize", "detect", "reasoning"), tok, cfg, split="heldout", seed=2)
    for i, s in enumerate(want):
        r = again.sample(3, i)
        assert torch.equal(r.input_ids, s.input_ids) and (r.label, r.task, r.fact_spans) == (s.label, s.task,
                                                                                            s.fact_spans)
