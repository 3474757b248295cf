"""Tokenizing very long texts in chunks that give exactly the ids of tokenizing the whole text.

BERT-family (WordPiece) tokenizers never join characters across whitespace, so cutting the text at a
whitespace character (one not followed by a combining mark, which normalisation could merge) cannot
change any token. Chunks are tokenized as one batch, in parallel inside the fast tokenizer.
"""
from __future__ import annotations

import unicodedata
from typing import Iterator, List

import torch


def _cut_points(text: str, chunk_chars: int) -> Iterator[int]:
    pos, n = 0, len(text)
    while n - pos > chunk_chars:
        cut = pos + chunk_chars
        # Walk back to a whitespace whose next character is not a combining mark.
        while cut > pos and not (text[cut - 1].isspace() and not unicodedata.combining(text[cut])):
            cut -= 1
        if cut == pos:  # no whitespace in this window: walk forward to the next one instead
            cut = pos + chunk_chars
            while cut < n and not (text[cut - 1].isspace() and not unicodedata.combining(text[cut])):
                cut += 1
            if cut >= n:
                break
        yield cut
        pos = cut


def text_chunks(text: str, chunk_chars: int = 1 << 16) -> List[str]:
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be positive, got {chunk_chars}")
    bounds = [0, *_cut_points(text, chunk_chars), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


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
