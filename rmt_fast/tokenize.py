"""Tokenizers: offline WordPiece loading, and very long texts tokenized in chunks that give exactly the
ids of tokenizing the whole text (where a text may be cut: ``rmt_fast.text``). Chunks are tokenized as
one batch, in parallel inside the fast tokenizer.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import List, Optional

import torch

from .text import text_chunks

__all__ = ["load_tokenizer", "max_word_chars", "text_chunks", "tokenize_long", "wordpiece_tokenizer"]


def wordpiece_tokenizer(vocab_file, do_lower_case=None):
    """A fast BERT WordPiece tokenizer from a vocab.txt, offline.

    do_lower_case=None reads it from a tokenizer_config.json beside the vocabulary, else infers it:
    a vocabulary with upper-case word pieces is a cased one.
    """
    from transformers import BertTokenizerFast

    vocab_file = Path(vocab_file)
    tokens = vocab_file.read_text(encoding="utf-8").splitlines()
    if do_lower_case is None:
        conf = vocab_file.parent / "tokenizer_config.json"
        if conf.is_file() and "do_lower_case" in json.loads(conf.read_text(encoding="utf-8")):
            do_lower_case = bool(json.loads(conf.read_text(encoding="utf-8"))["do_lower_case"])
        else:
            do_lower_case = not any(t.lower() != t for t in tokens if not (t.startswith("[") and t.endswith("]")))
    # transformers 5 takes the vocabulary as `vocab` (and silently ignores `vocab_file`); 4.x as `vocab_file`.
    if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters:
        return BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=do_lower_case)
    return BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=do_lower_case)


def load_tokenizer(path):
    """A tokenizer from a folder (tokenizer.json, or vocab.txt with its configs) or a vocab.txt file."""
    from transformers import AutoTokenizer

    p = Path(path)
    if p.is_file():
        return wordpiece_tokenizer(p)
    if (p / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(p))
    if (p / "vocab.txt").is_file():
        return wordpiece_tokenizer(p / "vocab.txt")
    raise FileNotFoundError(f"no tokenizer at {p}: give a folder with tokenizer.json or vocab.txt, or a vocab.txt")


def max_word_chars(tokenizer) -> Optional[int]:
    """The longest word a WordPiece tokenizer splits into pieces (longer ones are one [UNK]); None if unknown."""
    for model in (getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None),
                  getattr(tokenizer, "wordpiece_tokenizer", None)):
        value = getattr(model, "max_input_chars_per_word", None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def tokenize_long(text: str, tokenizer, chunk_chars: int = 1 << 16, chunks_per_call: int = 64) -> torch.Tensor:
    """[N] int64 ids of ``text`` without special tokens, tokenized in chunks of about ``chunk_chars``."""
    if not isinstance(text, str):
        raise TypeError(f"expected a str, got {type(text).__name__}")
    chunks = text_chunks(text, chunk_chars)
    ids: List[int] = []
    for i in range(0, len(chunks), chunks_per_call):
        enc = tokenizer(chunks[i:i + chunks_per_call], add_special_tokens=False,
                        return_attention_mask=False, return_token_type_ids=False)
        for part in enc["input_ids"]:
            ids.extend(part)
    return torch.tensor(ids, dtype=torch.int64)
