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


def _to_tensor(doc) -> torch.Tensor:
    if isinstance(doc, torch.Tensor):
        return doc
    if isinstance(doc, np.ndarray):
        return torch.from_numpy(doc)
    if isinstance(doc, (list, tuple, range)):
        if not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in doc):
            raise TypeError("a list of token ids must hold Python ints only")
        return torch.tensor(list(doc), dtype=torch.int64)
    raise TypeError(f"expected a tensor, numpy array or list of ints, got {type(doc).__name__}")


def _problem(t: torch.Tensor, config: RMTConfig) -> str | None:
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        return f"token ids must be integers, got dtype {t.dtype}"
    if t.dim() != 1:
        return f"expected a 1-D sequence of token ids, got shape {tuple(t.shape)}"
    if t.numel() == 0:
        return None
    V, M = config.vocab_size, config.num_mem_tokens
    bad = (t < 0) | (t >= V)
    if bool(bad.any()):
        pos = int(bad.nonzero()[0])
        value = int(t[pos])
        if V <= value < V + M:
            return (f"id {value} at position {pos} collides with the memory-token ids {V}..{V + M - 1}, "
                    "which the model reserves")
        return f"id {value} at position {pos} is outside the vocabulary [0, {V})"
    return None


def as_documents(input_ids, config: RMTConfig) -> List[torch.Tensor]:
    """A [B, L] integer tensor or a sequence of 1-D id sequences -> list of 1-D int64 CPU tensors."""
    if isinstance(input_ids, (torch.Tensor, np.ndarray)) and input_ids.ndim == 2:
        input_ids = list(input_ids)
    if isinstance(input_ids, (torch.Tensor, np.ndarray, str, bytes)):
        raise InvalidDocumentsError({0: "expected a [B, L] tensor or a list of documents"})
    docs, problems = [], {}
    for i, doc in enumerate(input_ids):
        try:
            t = _to_tensor(doc)
        except TypeError as e:
            problems[i] = str(e)
            continue
        p = _problem(t, config)
        if p:
            problems[i] = p
        else:
            docs.append(t.detach().to("cpu", torch.int64))
    if problems:
        raise InvalidDocumentsError(problems)
    return docs
