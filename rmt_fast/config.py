"""RMTConfig: the recurrent-memory settings around a BERT-family backbone, validated once."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Optional

ALIGNMENTS = ("right", "left", "center")
# Text tokens per segment = input_size - num_mem_tokens - SPECIAL_PER_SEGMENT ([CLS] and two [SEP]).
SPECIAL_PER_SEGMENT = 3


@dataclass(frozen=True)
class RMTConfig:
    """Recurrent memory settings.

    vocab_size is the tokenizer's vocabulary V; the memory tokens take the ids V..V+M-1 of the
    extended word-embedding matrix, exactly as the reference does.
    """

    vocab_size: int
    num_mem_tokens: int = 10
    input_size: int = 512
    segment_alignment: str = "right"
    max_n_segments: Optional[int] = None
    cls_token_id: int = 101
    sep_token_id: int = 102
    pad_token_id: int = 0
    num_labels: int = 2
    label_names: Optional[tuple] = None
    # Gradient through the memory (the official RMT flag: "max number of previous segments in gradient
    # computation"): depth k >= 0 backpropagates through the current segment and the k before it
    # (k + 1 segments; 0: the current one only); -1 through every segment and the initial memory.
    bptt_depth: int = -1
    sum_loss: bool = False  # reference: loss of the last segment only, or the mean over segments.

    def __post_init__(self):
        def fail(msg):
            raise ValueError(f"RMTConfig: {msg}")

        for name in ("vocab_size", "num_mem_tokens", "input_size", "num_labels"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                fail(f"{name} must be a positive int, got {v!r}")
        if self.segment_size < 1:
            fail(f"input_size {self.input_size} leaves no room for text after {self.num_mem_tokens} "
                 f"memory tokens and {SPECIAL_PER_SEGMENT} special tokens")
        if self.segment_alignment not in ALIGNMENTS:
            fail(f"segment_alignment must be one of {ALIGNMENTS}, got {self.segment_alignment!r}")
        if self.max_n_segments is not None and (not isinstance(self.max_n_segments, int)
                                                or self.max_n_segments < 1):
            fail(f"max_n_segments must be None or a positive int, got {self.max_n_segments!r}")
        for name in ("cls_token_id", "sep_token_id", "pad_token_id"):
            v = getattr(self, name)
            if not isinstance(v, int) or not 0 <= v < self.vocab_size:
                fail(f"{name} must be an id in [0, {self.vocab_size}), got {v!r}")
        if self.label_names is not None:
            object.__setattr__(self, "label_names", tuple(str(n) for n in self.label_names))
            if len(self.label_names) != self.num_labels:
                fail(f"{len(self.label_names)} label_names for num_labels={self.num_labels}")
        if not isinstance(self.bptt_depth, int) or isinstance(self.bptt_depth, bool) or self.bptt_depth < -1:
            fail(f"bptt_depth must be -1 (every segment) or an int >= 0 (previous segments), "
                 f"got {self.bptt_depth!r}")

    @property
    def segment_size(self) -> int:
        """Text tokens per segment (499 for input_size 512 and 10 memory tokens)."""
        return self.input_size - self.num_mem_tokens - SPECIAL_PER_SEGMENT

    @property
    def mem_token_ids(self) -> range:
        return range(self.vocab_size, self.vocab_size + self.num_mem_tokens)

    @property
    def special_token_ids(self) -> tuple:
        return (self.cls_token_id, self.sep_token_id, self.pad_token_id)

    def replace(self, **changes) -> "RMTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["label_names"] is not None:
            d["label_names"] = list(d["label_names"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RMTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"RMTConfig: unknown keys {unknown}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
