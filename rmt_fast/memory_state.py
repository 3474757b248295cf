"""A document's memory state: what a reader keeps of everything it has read, and its file.

An RMT compresses all it has read into the memory, M x H numbers whatever the length. A
``MemoryState`` holds that memory after the last full segment read, the text ids not yet consumed
(the tail, shorter than one segment), the counts read, and what it was computed by: a fingerprint of
the model (its config and a hash of its weights) and the compute dtype. ``Engine.read`` makes one,
``Engine.ask`` answers questions from one (engine/reading.py).

File: safetensors (``memory`` [M, H] float32, ``tail`` [n] int64) with JSON metadata, written
atomically; a checksum of the tensors' bytes in the metadata makes a corrupt file an error, never a
wrong answer.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Tuple

import torch

from . import files

FORMAT = "rmt_fast.MemoryState/1"
_KEY = "rmt_fast_state"


class MemoryStateError(ValueError):
    """A memory state that cannot be used: unreadable, corrupt, or from another model or setting."""


def model_fingerprint(model) -> str:
    """sha256 of the RMT config and every tensor of the model's state dict (name, dtype, shape, bytes)."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_tagged_safetensors(path: Path, key: str, fmt: str, error: type, what: str,
                            hint: str = "") -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(the JSON dict stored under ``key`` in the file's metadata, its tensors) of a safetensors file of
    format ``fmt`` (its "format" field): a memory state's or a run checkpoint's. Raises ``error`` naming
    the file and the ``what`` it should be, if it cannot be read, is not whole (then ``hint`` follows), or
    holds another format."""
    from safetensors.torch import load
    try:
        data = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read the {what}: {e.strerror or e}") from e
    try:
        (n,) = struct.unpack("<Q", data[:8])
        meta = json.loads(json.loads(data[8:8 + n])["__metadata__"][key])
        tensors = load(data)
    except Exception as e:  # noqa: BLE001 - any failure to parse means a damaged or foreign file
        raise error(f"{path}: not a readable {what} (truncated or corrupt: {type(e).__name__}: {e}){hint}") from e
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != fmt:
        raise error(f"{path}: unknown {what} format {found!r} (expected {fmt})")
    return meta, tensors


def _checksum(memory: torch.Tensor, tail: torch.Tensor) -> str:
    h = hashlib.sha256(memory.contiguous().numpy().tobytes())
    h.update(tail.contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class MemoryState:
    """What a reader keeps of a document read so far (see the module doc)."""

    memory: torch.Tensor     # [M, H] float32 (CPU): the memory after the last full segment read
    tail: torch.Tensor       # [n] int64 (CPU), n < segment_size: text ids read but not yet in a segment
    n_tokens: int            # text ids read (special ids removed), the tail included
    n_segments: int          # full segments consumed
    fingerprint: str         # model_fingerprint of the model that read it
    config: dict             # that model's RMTConfig.to_dict()
    dtype: str               # the compute dtype, e.g. 'float32'
    origin: dict = field(default_factory=dict)   # free notes kept in the file (the CLI: model and tokenizer paths)

    def check_usable(self, fingerprint: str, config: dict, dtype: str, where: str = "this memory state") -> None:
        """Raise MemoryStateError unless this state was computed by the same model in the same dtype."""
        for key, what in (("segment_alignment", "alignment"), ("num_mem_tokens", "memory size"),
                          ("input_size", "input size")):
            if self.config.get(key) != config.get(key):
                raise MemoryStateError(f"{where} was read with {key}={self.config.get(key)!r}; this model has "
                                       f"{key}={config.get(key)!r} ({what} differs): read the document again")
        if self.fingerprint != fingerprint:
            raise MemoryStateError(f"{where} was read by another model (fingerprint {self.fingerprint[:12]}, "
                                   f"this model {fingerprint[:12]}: other weights or config); read it again")
        if self.dtype != dtype:
            raise MemoryStateError(f"{where} was computed in {self.dtype}; this Engine computes in {dtype}")

    # -- file -------------------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write to ``path`` atomically (temporary file, fsync, rename)."""
        from safetensors.torch import save
        memory = self.memory.detach().cpu().float().contiguous()
        tail = self.tail.detach().cpu().to(torch.int64).contiguous()
        meta = {"format": FORMAT, "n_tokens": int(self.n_tokens), "n_segments": int(self.n_segments),
                "fingerprint": self.fingerprint, "config": self.config, "dtype": self.dtype,
                "checksum": _checksum(memory, tail), "origin": self.origin}
        data = save({"memory": memory, "tail": tail}, metadata={_KEY: json.dumps(meta)})
        files.write_bytes(path, data)

    @classmethod
    def load(cls, path) -> "MemoryState":
        """Read a state written by ``save``; MemoryStateError naming the file if it is not one, whole."""
        path = Path(path)
        meta, tensors = read_tagged_safetensors(path, _KEY, FORMAT, MemoryStateError, "rmt_fast memory state")
        memory, tail = tensors.get("memory"), tensors.get("tail")
        cfg = meta["config"]
        M, S = cfg["num_mem_tokens"], cfg["input_size"] - cfg["num_mem_tokens"] - 3
        if memory is None or memory.dtype != torch.float32 or memory.dim() != 2 or memory.shape[0] != M:
            raise MemoryStateError(f"{path}: memory must be [num_mem_tokens={M}, hidden] float32, got "
                                   f"{None if memory is None else (tuple(memory.shape), memory.dtype)}")
        if tail is None or tail.dtype != torch.int64 or tail.dim() != 1 or tail.numel() >= S:
            raise MemoryStateError(f"{path}: tail must be [n < {S}] int64, got "
                                   f"{None if tail is None else (tuple(tail.shape), tail.dtype)}")
        if _checksum(memory, tail) != meta.get("checksum"):
            raise MemoryStateError(f"{path}: the checksum does not match the tensors (the file is corrupt)")
        return cls(memory=memory, tail=tail, n_tokens=int(meta["n_tokens"]), n_segments=int(meta["n_segments"]),
                   fingerprint=meta["fingerprint"], config=cfg, dtype=meta["dtype"],
                   origin=meta.get("origin", {}))
