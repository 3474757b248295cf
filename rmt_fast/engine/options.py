"""The options of one classify run, in one typed, validated object.

``Engine.classify_stream(sources, tokenizer, options=RunOptions(...))``; the same names as keyword
arguments still work (``classify_stream(..., batch_size=4, on_error='nan')``) and override
``options``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from . import run_checkpoints


@dataclass(frozen=True)
class RunOptions:
    """batch_size: documents run side by side (slots). empty: what a document with no tokens left gets,
    'error' or 'special' (one segment of special tokens). progress: a tqdm bar on stderr.
    chunk_chars: characters per tokenizer call. workers: tokenizer threads. errors: UTF-8 decoding,
    'strict' or 'replace'. on_error: a bad document 'raise's a DocumentError, or gets 'nan' logits and
    the run goes on. lookahead: documents opened (tokenized) ahead of the slots (None: batch_size + 2).
    checkpoint_dir: resume a long run (``run_checkpoints.py``): each document's memory is saved there
    every ``checkpoint_every`` segments (None: 64) and its logits once finished; a rerun with the same
    arguments resumes each unfinished document from its last save and skips the finished ones. The
    files are removed when the call returns, unless keep_checkpoints."""

    batch_size: int = 8
    empty: str = "error"
    progress: bool = False
    chunk_chars: int = 1 << 16
    workers: int = 2
    errors: str = "strict"
    on_error: str = "raise"
    lookahead: Optional[int] = None
    checkpoint_dir: Optional[Union[str, Path]] = None
    checkpoint_every: Optional[int] = None
    keep_checkpoints: bool = False

    def __post_init__(self):
        for name in ("batch_size", "chunk_chars", "workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.lookahead is not None and (not isinstance(self.lookahead, int) or isinstance(self.lookahead, bool)
                                           or self.lookahead < 0):
            raise ValueError(f"lookahead must be a non-negative int or None, got {self.lookahead!r}")
        for name, allowed in (("empty", ("error", "special")), ("errors", ("strict", "replace")),
                              ("on_error", ("raise", "nan"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be {' or '.join(map(repr, allowed))}, got {getattr(self, name)!r}")
        if not isinstance(self.progress, bool):
            raise ValueError(f"progress must be a bool, got {self.progress!r}")
        run_checkpoints.check_options(self.checkpoint_dir, self.checkpoint_every, self.keep_checkpoints)

    def replace(self, **changes) -> "RunOptions":
        return dataclasses.replace(self, **changes)

    @classmethod
    def merge(cls, options: Optional["RunOptions"], **overrides) -> "RunOptions":
        """``options`` (default: the defaults) with the keyword arguments that are not None."""
        base = cls() if options is None else options
        if not isinstance(base, cls):
            raise TypeError(f"options must be a RunOptions, got {type(options).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {', '.join(unknown)}; run options are {sorted(names)}")
        return base.replace(**{k: v for k, v in overrides.items() if v is not None})
