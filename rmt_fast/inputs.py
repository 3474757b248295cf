"""Checking documents of token ids before any compute, with errors that name the document."""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import torch

from .config import RMTConfig


class InvalidDocumentsError(ValueError):
    """Some documents cannot be classified; ``problems`` maps each one's index to what is wrong.

    Raised before any compute, so nothing is lost: drop or fix the named documents and call again.
    """

    def __init__(self, problems: Dict[int, str]):
        self.problems = dict(sorted(problems.items()))
        shown = [f"document {i}: {p}" for i, p in list(self.problems.items())[:10]]
        more = len(self.problems) - len(shown)
        super().__init__("; ".join(shown) + (f"; and {more} more" if more > 0 else ""))


def _as_array(doc) -> np.ndarray:
    """The ids of one document as a numpy integer array of its own dtype, without a copy where possible.

    Accepted: a tensor of any integer dtype (int8 .. int64, uint8 .. uint64), a numpy array of any
    integer dtype, or a list/tuple/range of ints; anything else raises TypeError saying what it got.
    """
    if isinstance(doc, torch.Tensor):
        if doc.dtype == torch.bool or doc.is_floating_point() or doc.is_complex():
            raise TypeError(f"token ids must be integers, got dtype {doc.dtype}")
        try:
            return doc.detach().cpu().numpy()
        except (TypeError, RuntimeError) as e:
            raise TypeError(f"token ids must be integers, got dtype {doc.dtype}") from e
    if isinstance(doc, np.ndarray):
        if doc.dtype.kind not in "iu":
            raise TypeError(f"token ids must be integers, got dtype {doc.dtype}")
        return doc
    if isinstance(doc, (list, tuple, range)):
        if not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in doc):
            raise TypeError("a list of token ids must hold Python ints only")
        try:
            return np.array(doc, dtype=np.int64)
        except OverflowError:   # an int beyond int64 (outside any vocabulary): keep it exact to name it
            return np.array(doc, dtype=object)
    raise TypeError(f"expected a tensor, numpy array or list of ints, got {type(doc).__name__}")


def _problem(ids: np.ndarray, config: RMTConfig) -> str | None:
    """What is wrong with a document's ids (None: nothing). Compared exactly, whatever the dtype."""
    if ids.ndim != 1:
        return f"expected a 1-D sequence of token ids, got shape {tuple(ids.shape)}"
    if ids.size == 0:
        return None
    V, M = config.vocab_size, config.num_mem_tokens
    # uint64 compares in its own dtype (int64 would wrap values >= 2**63); every other dtype in int64.
    wide = ids if ids.dtype in (np.uint64, object) else ids.astype(np.int64, copy=False)
    bad = (wide >= V) if ids.dtype == np.uint64 else (wide < 0) | (wide >= V)
    if bool(bad.any()):
        pos = int(np.flatnonzero(bad)[0])
        value = int(ids[pos])
        if V <= value < V + M:
            return (f"id {value} at position {pos} collides with the memory-token ids {V}..{V + M - 1}, "
                    "which the model reserves")
        return f"id {value} at position {pos} is outside the vocabulary [0, {V})"
    return None


def as_documents(input_ids, config: RMTConfig) -> List[torch.Tensor]:
    """A [B, L] integer tensor or a sequence of 1-D id sequences -> list of 1-D int64 CPU tensors.

    Any integer dtype is accepted (torch or numpy, signed or unsigned, 8 to 64 bits); ids are checked
    against the vocabulary exactly, before any conversion could wrap them.
    """
    if isinstance(input_ids, (torch.Tensor, np.ndarray)) and input_ids.ndim == 2:
        input_ids = list(input_ids)
    if isinstance(input_ids, (torch.Tensor, np.ndarray, str, bytes)):
        raise InvalidDocumentsError({0: "expected a [B, L] tensor or a list of documents"})
    docs, problems = [], {}
    for i, doc in enumerate(input_ids):
        try:
            ids = _as_array(doc)
        except TypeError as e:
            problems[i] = str(e)
            continue
        p = _problem(ids, config)
        if p:
            problems[i] = p
        else:
            docs.append(torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)))
    if problems:
        raise InvalidDocumentsError(problems)
    return docs
