"""The report's synthetic tasks (section 3): Memorize, Detect & Memorize, Reasoning over long text.

A sample is a background of whole sentences of public-domain text (``KINDS``: Jane Austen's novels,
Shakespeare's plays and poems, the King James Bible) with one or two facts inserted at sentence
boundaries and the question at the very end. Its token ids fill *exactly* ``N * S`` text tokens
(S = ``RMTConfig.segment_size``), so the model cuts it into exactly N full segments:

- the background is whole sentences, then one sentence truncated at a word boundary (a tokenizer offset
  gap) chosen so that the count comes out exact; facts and question are never cut;
- background sentences that name a place or a person of the tasks are dropped when the corpus is
  built, so the inserted fact is the only one in the document and the label is unambiguous;
- train, validation and test backgrounds come from different works (``SPLITS``), and the ``heldout``
  split from a kind of text (scripture) that no other split has;
- sample ``i`` of a generator depends only on (task, split, seed, N, i): the same on every process
  and in every run, which is what sharded evaluation relies on.

Labels are the index of the answer among ``PLACES`` (6 classes, named ``LABEL_NAMES``).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .config import RMTConfig
from .tokenize import load_tokenizer  # noqa: F401  (re-exported: tasks.load_tokenizer)

PLACES = ("bathroom", "hallway", "garden", "office", "bedroom", "kitchen")
LABEL_NAMES = PLACES
NAMES = ("Mary", "John", "Daniel", "Sandra")
VERBS = ("moved", "went", "went back", "journeyed", "travelled")
DIRECTIONS = ("north", "south", "east", "west")
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}
TASKS = ("memorize", "detect", "reasoning")
TASK_ALIASES = {"memorize": "memorize", "detect": "detect", "detect_and_memorize": "detect",
                "detect-and-memorize": "detect", "reasoning": "reasoning", "qa4": "reasoning"}
# Background sources (rmt_fast/data/noise/<name>.txt.gz) by kind of text; scripts/make_noise.py makes
# the non-Austen ones. Each work is in one split only; the scripture kind is in "heldout" only, so a
# model is measured on a kind of text it never saw in training or validation.
KINDS = {
    "novel": ("emma", "mansfield-park", "pride-and-prejudice", "sense-and-sensibility", "northanger-abbey",
              "persuasion"),
    "drama": ("shakespeare-train", "shakespeare-validation", "shakespeare-test"),
    "scripture": ("kjv-bible",),
}
SPLITS = {
    "train": ("emma", "mansfield-park", "pride-and-prejudice", "sense-and-sensibility", "shakespeare-train"),
    "validation": ("northanger-abbey", "shakespeare-validation"),
    "test": ("persuasion", "shakespeare-test"),
    "heldout": ("kjv-bible",),
}

# Not \b: "_" is a word character, and the novels mark italics as "_office_".
_ENTITY = re.compile(r"(?<![A-Za-z0-9])(" + "|".join(PLACES + NAMES) + r")s?(?![A-Za-z0-9])", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'’”)]*\s+(?=[\"'‘“(]?[A-Z])")


@dataclass
class Sample:
    """One document of a task. Spans are half-open ``(start, end)`` indices into ``input_ids``."""

    input_ids: torch.Tensor                  # [n_segments * segment_size] int64, no special ids
    label: int
    fact_spans: Tuple[Tuple[int, int], ...]
    question_span: Tuple[int, int]
    n_segments: int
    task: str
    facts: Tuple[str, ...]
    question: str

    @property
    def answer(self) -> str:
        return LABEL_NAMES[self.label]


def noise_dir() -> Path:
    return Path(str(resources.files("rmt_fast") / "data" / "noise"))


def _sentences(text: str) -> List[str]:
    out = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        # Headings ("Chapter 1", titles) carry no sentence-final punctuation.
        if not para or para[-1] not in ".!?\"'’”)":
            continue
        out.extend(s for s in _SENTENCE_END.split(para) if len(s) > 1)
    return out


@dataclass
class _Corpus:
    """Pretokenized background sentences, flat: sentence j is tokens[start[j]:start[j] + length[j]]."""

    tokens: np.ndarray       # [T] int64
    start: np.ndarray        # [J] int64
    length: np.ndarray       # [J] int64
    boundary: np.ndarray     # [T] bool: a cut just before this token does not split a word


CORPUS_VERSION = 2  # bump when sentence splitting or filtering changes: invalidates the disk cache


def _tokenizer_key(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    h = hashlib.sha1(json.dumps([tokenizer.__class__.__name__, getattr(tokenizer, "do_lower_case", None),
                                 vocab]).encode("utf-8"))
    return h.hexdigest()[:16]


def cache_dir() -> Optional[Path]:
    """Where tokenized corpora are kept between runs: $RMT_FAST_CACHE, else ~/.cache/rmt_fast ('' disables)."""
    d = os.environ.get("RMT_FAST_CACHE", str(Path.home() / ".cache" / "rmt_fast"))
    return Path(d) if d else None


_CORPUS_CACHE: dict = {}


def _corpus(split: str, tokenizer) -> _Corpus:
    novels = [(n, (noise_dir() / f"{n}.txt.gz").stat().st_size) for n in SPLITS[split]]
    rules = [_ENTITY.pattern, _SENTENCE_END.pattern]         # a changed filter or splitter rebuilds the cache
    key = (split, hashlib.sha1(json.dumps([novels, _tokenizer_key(tokenizer), rules]).encode()).hexdigest()[:16])
    if key in _CORPUS_CACHE:
        return _CORPUS_CACHE[key]
    cdir = cache_dir()
    cfile = cdir / f"corpus-v{CORPUS_VERSION}-{split}-{key[1]}.npz" if cdir else None
    if cfile is not None and cfile.is_file():
        with np.load(cfile) as z:
            corpus = _Corpus(tokens=z["tokens"], start=z["start"], length=z["length"], boundary=z["boundary"])
        _CORPUS_CACHE[key] = corpus
        return corpus
    sents = []
    for novel in SPLITS[split]:
        with gzip.open(noise_dir() / f"{novel}.txt.gz", "rt", encoding="utf-8") as f:
            sents.extend(s for s in _sentences(f.read()) if not _ENTITY.search(s))
    enc = tokenizer(sents, add_special_tokens=False, return_offsets_mapping=True)
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    ids, bnd, lengths = [], [], []
    for toks, offs in zip(enc["input_ids"], enc["offset_mapping"]):
        if not toks or special.intersection(toks):
            continue
        b = [True] + [offs[i][0] > offs[i - 1][1] for i in range(1, len(toks))]
        ids.extend(toks)
        bnd.extend(b)
        lengths.append(len(toks))
    length = np.asarray(lengths, dtype=np.int64)
    corpus = _Corpus(tokens=np.asarray(ids, dtype=np.int64), start=np.cumsum(length) - length,
                     length=length, boundary=np.asarray(bnd, dtype=bool))
    _CORPUS_CACHE[key] = corpus
    if cfile is not None:
        try:
            cfile.parent.mkdir(parents=True, exist_ok=True)
            tmp = cfile.with_name(f"{cfile.stem}.{os.getpid()}.tmp.npz")
            np.savez(tmp, tokens=corpus.tokens, start=corpus.start, length=corpus.length, boundary=corpus.boundary)
            os.replace(tmp, cfile)
        except OSError:
            pass  # a read-only cache only costs time
    return corpus


class TaskGenerator:
    """Samples of one task for one tokenizer and segment layout.

    ``TaskGenerator("detect", tok, config, split="test", seed=0).sample(n_segments=16, index=3)``.
    ``task`` is ``memorize``, ``detect`` or ``reasoning``; ``mix`` of several names (a tuple) draws the
    task of each sample at random, which is how one model is trained on several tasks.
    """

    def __init__(self, task, tokenizer, config: RMTConfig, split: str = "train", seed: int = 0):
        names = (task,) if isinstance(task, str) else tuple(task)
        try:
            self.tasks = tuple(TASK_ALIASES[t.lower()] for t in names)
        except KeyError as e:
            raise ValueError(f"unknown task {e.args[0]!r}; choose from {sorted(TASK_ALIASES)}") from None
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {list(SPLITS)}")
        self.tokenizer, self.config, self.split, self.seed = tokenizer, config, split, int(seed)
        self.corpus = _corpus(split, tokenizer)
        self._encode_cache: dict = {}
        if "reasoning" in self.tasks:
            longest = max(len(self._encode(f"The {p} is north of the {p}.")) for p in PLACES) * 2 + \
                max(len(self._encode(f"What is the {p} north of?")) for p in PLACES)
        else:
            longest = max(len(self._encode(f"{n} {v} to the {p}.")) + len(self._encode(f"Where is {n}?"))
                          for n in NAMES for v in VERBS for p in PLACES)
        if longest > config.segment_size:
            raise ValueError(f"segment_size {config.segment_size} is too small for facts and question "
                             f"({longest} tokens); use a larger input_size")

    def _encode(self, text: str) -> List[int]:
        if text not in self._encode_cache:
            self._encode_cache[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._encode_cache[text]

    def _rng(self, n_segments: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(n_segments), int(index),
                                      list(SPLITS).index(self.split), sum(TASKS.index(t) + 1 << 2 * k
                                                                          for k, t in enumerate(self.tasks))])

    def _facts(self, task: str, rng) -> Tuple[List[str], str, int]:
        if task in ("memorize", "detect"):
            name = NAMES[rng.integers(len(NAMES))]
            place = int(rng.integers(len(PLACES)))
            verb = VERBS[rng.integers(len(VERBS))]
            return [f"{name} {verb} to the {PLACES[place]}."], f"Where is {name}?", place
        a1, a2, b = (int(x) for x in rng.choice(len(PLACES), size=3, replace=False))
        d1, d2 = (DIRECTIONS[x] for x in rng.choice(len(DIRECTIONS), size=2, replace=False))
        facts = [f"The {PLACES[a1]} is {d1} of the {PLACES[b]}.", f"The {PLACES[a2]} is {d2} of the {PLACES[b]}."]
        asked = int(rng.integers(2))
        d, answer = (d1, a1) if asked == 0 else (d2, a2)
        if rng.integers(2):
            question = f"What is {d} of the {PLACES[b]}?"
        else:
            question = f"What is the {PLACES[b]} {OPPOSITE[d]} of?"
        order = rng.permutation(2)
        return [facts[i] for i in order], question, answer

    def _background(self, n_tokens: int, rng) -> Tuple[np.ndarray, np.ndarray]:
        """Sentences filling exactly n_tokens: (sentence ids, their lengths), the last one maybe cut."""
        c = self.corpus
        J, total = len(c.length), int(c.length.sum())
        s0 = int(rng.integers(J))
        k = J * (n_tokens // total + 1) + 1
        order = (s0 + np.arange(k)) % J
        cum = np.cumsum(c.length[order])
        whole = int(np.searchsorted(cum, n_tokens, side="right"))
        rest = n_tokens - (int(cum[whole - 1]) if whole else 0)
        sents, lens = list(order[:whole]), list(c.length[order[:whole]])
        if rest:
            # The first following sentence that has a word boundary exactly `rest` tokens in.
            j = whole
            while True:
                s = (s0 + j) % J
                if c.length[s] > rest and c.boundary[c.start[s] + rest]:
                    break
                j += 1
                if j - whole > J:
                    raise RuntimeError(f"no background sentence can be cut at {rest} tokens")
            sents.append(s)
            lens.append(rest)
        return np.asarray(sents, dtype=np.int64), np.asarray(lens, dtype=np.int64)

    def sample(self, n_segments: int, index: int) -> Sample:
        if n_segments < 1:
            raise ValueError(f"n_segments must be >= 1, got {n_segments}")
        rng = self._rng(n_segments, index)
        task = self.tasks[int(rng.integers(len(self.tasks)))]
        facts, question, label = self._facts(task, rng)
        fact_ids = [self._encode(f) for f in facts]
        q_ids = self._encode(question)
        n_text = n_segments * self.config.segment_size
        n_bg = n_text - sum(map(len, fact_ids)) - len(q_ids)
        sents, lens = self._background(n_bg, rng)
        # Insertion points are sentence boundaries 0..len(sents)-1 of the background (the cut sentence,
        # if any, stays last, just before the question).
        n_slots = len(sents) - (1 if lens.size and lens[-1] < self.corpus.length[sents[-1]] else 0) + 1
        if task == "memorize":
            slots = [0]
        elif task == "detect":
            slots = [int(rng.integers(n_slots))]
        else:
            slots = sorted(int(x) for x in rng.integers(n_slots, size=2))
        # Gather the background tokens in one vectorised step.
        c = self.corpus
        offs = np.cumsum(lens) - lens
        gather = np.repeat(c.start[sents] - offs, lens) + np.arange(int(lens.sum()))
        bg = c.tokens[gather]
        pieces, spans, pos, prev = [], [], 0, 0
        for slot, f in zip(slots, fact_ids):
            cut = int(offs[slot]) if slot < len(offs) else int(lens.sum())
            pieces.append(bg[prev:cut])
            pos += cut - prev
            pieces.append(np.asarray(f, dtype=np.int64))
            spans.append((pos, pos + len(f)))
            pos += len(f)
            prev = cut
        pieces.append(bg[prev:])
        pieces.append(np.asarray(q_ids, dtype=np.int64))
        ids = np.concatenate(pieces)
        assert ids.size == n_text, (ids.size, n_text)
        return Sample(input_ids=torch.from_numpy(ids), label=label, fact_spans=tuple(spans),
                      question_span=(n_text - len(q_ids), n_text), n_segments=n_segments, task=task,
                      facts=tuple(facts), question=question)

    def samples(self, n_segments: Union[int, Sequence[int]], indices: Sequence[int]) -> List[Sample]:
        """Sample i of indices has n_segments segments, or n_segments[i] where a sequence is given."""
        if isinstance(n_segments, (int, np.integer)):
            n_segments = [n_segments] * len(indices)
        if len(n_segments) != len(indices):
            raise ValueError(f"{len(n_segments)} segment counts for {len(indices)} samples")
        return [self.sample(n, i) for n, i in zip(n_segments, indices)]

    def batch(self, n_segments: Union[int, Sequence[int]],
              indices: Sequence[int]) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """(list of id tensors, labels [B] int64) for the given sample indices (segment counts as samples)."""
        ss = self.samples(n_segments, indices)
        return [s.input_ids for s in ss], torch.tensor([s.label for s in ss], dtype=torch.int64)


def task_config(config: RMTConfig) -> RMTConfig:
    """The RMTConfig with the tasks' 6 labels named by the places."""
    return config.replace(num_labels=len(LABEL_NAMES), label_names=LABEL_NAMES)
