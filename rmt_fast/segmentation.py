"""The reference's segmentation of documents, vectorised over a whole batch of documents.

Steps (docs/REFERENCE.md): remove every PAD, CLS and SEP id; keep the head ``S * max_n_segments`` tokens;
cut into segments of at most S text tokens (right alignment: the first segment holds the remainder;
left: the last; center: ``ceil(L / ceil(L / S))`` tokens each); lay each segment out as
``[CLS] m_1..m_M [SEP] x_1..x_k [SEP] [PAD]...``.

All documents live in one flat int64 tensor with per-document offsets, so no step loops over
tokens or documents in Python.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .config import RMTConfig


@dataclass
class Documents:
    """Cleaned token ids of many documents, concatenated: document d is tokens[starts[d]:starts[d]+lengths[d]]."""

    tokens: torch.Tensor   # [N] int64
    starts: torch.Tensor   # [D] int64
    lengths: torch.Tensor  # [D] int64
    # [N] int64, where each kept token was in its document as given; only when asked for (keep_positions)
    positions: Optional[torch.Tensor] = None

    def __len__(self):
        return self.lengths.numel()


@dataclass
class Segments:
    """Every segment of every document, in document order then segment order."""

    doc: torch.Tensor      # [G] int64, the document of each segment
    index: torch.Tensor    # [G] int64, its position within the document (0 = first)
    start: torch.Tensor    # [G] int64, offset of its first text token in Documents.tokens
    length: torch.Tensor   # [G] int64, its number of text tokens (0 only for an empty document's segment)
    count: torch.Tensor    # [D] int64, segments per document
    first: torch.Tensor    # [D] int64, index of each document's first segment in these arrays

    def __len__(self):
        return self.doc.numel()


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(counts, 0) - counts


def clean_and_truncate(docs: Sequence[torch.Tensor], config: RMTConfig, keep_positions: bool = False) -> Documents:
    """Remove special ids and keep the head of each document (the reference's ``seq[:S*max_n_segments]``).

    keep_positions: also return, for each kept token, its index in its document as given (what marks
    on the raw document, such as fact spans, need to follow their tokens).

    Host memory stays close to the ids themselves: one document is not copied to be concatenated, a
    document without special ids is not copied to be filtered, and the per-token document index
    (needed only to regroup several documents) is int32.
    """
    lengths = torch.tensor([d.numel() for d in docs], dtype=torch.int64)
    if len(docs) == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return Documents(empty, empty, empty, empty if keep_positions else None)
    flat = docs[0].reshape(-1).to(torch.int64) if len(docs) == 1 else \
        torch.cat([d.reshape(-1).to(torch.int64) for d in docs])
    keep = ~torch.isin(flat, torch.tensor(config.special_token_ids, dtype=torch.int64))

    def doc_of():
        return torch.repeat_interleave(torch.arange(len(docs), dtype=torch.int32), lengths)

    if config.max_n_segments is not None:
        # Rank of each kept token inside its document; drop those past the limit.
        kept_upto = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(keep, 0)])
        rank = kept_upto[:-1] - (kept_upto[_offsets(lengths)][doc_of()] if len(docs) > 1 else 0)
        keep &= rank < config.segment_size * config.max_n_segments
    def positions_of(index: torch.Tensor) -> Optional[torch.Tensor]:
        """index: [K] flat indices of kept tokens -> [K] indices inside their own documents."""
        if not keep_positions:
            return None
        return index if len(docs) == 1 else index - _offsets(lengths)[doc_of()[index].long()]

    if bool(keep.all()):
        return Documents(flat, _offsets(lengths), lengths, positions_of(torch.arange(flat.numel())))
    if len(docs) == 1:
        new_lengths = keep.sum().reshape(1)
    else:
        new_lengths = torch.bincount(doc_of()[keep], minlength=len(docs))
    return Documents(flat[keep], _offsets(new_lengths), new_lengths,
                     positions_of(keep.nonzero().flatten()) if keep_positions else None)


def cut(docs: Documents, config: RMTConfig, empty_as_one_segment: bool = False) -> Segments:
    """Segment boundaries of every document, following the configured alignment.

    An empty document has no segment, as in the reference, unless ``empty_as_one_segment``: then it
    gets one segment with no text tokens.
    """
    S = config.segment_size
    L = docs.lengths
    n = (L + S - 1) // S
    if empty_as_one_segment:
        n = n.clamp(min=1)
    first = _offsets(n)
    G = int(n.sum())
    doc = torch.repeat_interleave(torch.arange(len(docs)), n)
    k = torch.arange(G) - first[doc]
    Ld, nd = L[doc], n[doc]
    if config.segment_alignment == "right":
        remainder = Ld - (nd - 1) * S
        offset = torch.where(k == 0, 0, remainder + (k - 1) * S)
        length = torch.where(k == 0, remainder, S)
    elif config.segment_alignment == "left":
        offset = k * S
        length = torch.where(k == nd - 1, Ld - (nd - 1) * S, S)
    else:  # center: the reference's range(0, L, ceil(L / n_seg)).
        step = (Ld + nd - 1) // nd.clamp(min=1)
        # With that step the reference may make fewer than n segments; recount with it.
        n = torch.zeros_like(n).index_add_(0, doc, (k * step < Ld.clamp(min=1)).long())
        keep = k * step < Ld.clamp(min=1)
        doc, k, Ld, step = doc[keep], k[keep], Ld[keep], step[keep]
        first = _offsets(n)
        offset = k * step
        length = torch.minimum(step, Ld - offset)
    return Segments(doc=doc, index=k, start=docs.starts[doc] + offset, length=length.clamp(min=0),
                    count=n, first=first)


def layout(tokens: torch.Tensor, start: torch.Tensor, length: torch.Tensor, config: RMTConfig) -> torch.Tensor:
    """Token ids of segments laid out as ``[CLS] mem [SEP] text [SEP] [PAD]...``.

    tokens: [N] int64; start, length: [B] int64 -> [B, input_size] int64.
    """
    T, M = config.input_size, config.num_mem_tokens
    B = start.numel()
    col = torch.arange(T)
    text_pos = col - (M + 2)                                    # [T]
    is_text = (text_pos >= 0) & (text_pos < length[:, None])    # [B, T]
    src = (start[:, None] + text_pos).clamp(0, max(tokens.numel() - 1, 0))
    gathered = tokens[src] if tokens.numel() else torch.zeros_like(src)
    ids = torch.where(is_text, gathered, config.pad_token_id)
    ids[:, 0] = config.cls_token_id
    ids[:, 1:M + 1] = torch.arange(config.vocab_size, config.vocab_size + M)
    ids[:, M + 1] = config.sep_token_id
    ids[torch.arange(B), M + 2 + length] = config.sep_token_id
    return ids


def key_lengths(length: torch.Tensor, config: RMTConfig) -> torch.Tensor:
    """Non-PAD positions of each segment: [CLS] + M memory + [SEP] + text + [SEP]."""
    return length + config.num_mem_tokens + 3
