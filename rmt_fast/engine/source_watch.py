"""Noticing, in microseconds, that a model's tensors changed since the Engine read them.

A plan holds copies of the model's weights (fused, packed, cast), so the Engine must rebuild it when
the model changes. Reading every weight per call would cost a pass over hundreds of MB; instead
``SourceWatch`` records, for every parameter and buffer, what PyTorch already tracks, and compares it:

- in-place writes (``optimizer.step()``, ``p.add_()``, ``load_state_dict``, which copies under
  ``no_grad``) bump the tensor's version counter ``tensor._version``;
- a new tensor behind a parameter (``p.data = x``, ``.to()``, ``.half()``, ``.double()``, ``.cuda()``)
  has a new data pointer, dtype or device;
- a replaced parameter, buffer or submodule (``module.weight = Parameter(...)``,
  ``load_state_dict(assign=True)``, ``parent.child = Linear(...)``) no longer sits where it was;
- writes through ``p.data`` (``p.data.copy_(ema)``, the usual EMA swap) bump no counter: ``.data`` is
  an alias with a version counter of its own. They are caught by a sample of ``SAMPLES`` elements
  spread over every tensor's storage, compared bit for bit (so NaN weights compare equal). A
  ``.data`` write that changes none of the sampled elements goes unnoticed: after such a partial
  edit, call ``Engine.refresh(force=True)``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

SAMPLES = 8                  # elements sampled per tensor
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _signature(t: torch.Tensor) -> tuple:
    # An inference tensor (made under torch.inference_mode) has no version counter: the samples watch it.
    return None if t.is_inference() else t._version, t.data_ptr(), t.dtype, t.device


def _sample_view(t: torch.Tensor) -> Optional[torch.Tensor]:
    """Up to SAMPLES elements spread over ``t``'s storage span, as a 1-D integer view of the same bits.

    A view, not a copy: a write through any alias of the storage (``p.data.copy_``) shows in it.
    """
    if t.numel() == 0 or t.element_size() not in _SAME_SIZE_INT:
        return None
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))        # elements from first to last
    step = max(1, span // SAMPLES)
    view = t.detach().as_strided((min(SAMPLES, span),), (step,), t.storage_offset())
    return view.view(_SAME_SIZE_INT[t.element_size()])


class SourceWatch:
    """What ``module``'s tensors and submodules look like now; ``changed()`` says whether they still do."""

    def __init__(self, module: nn.Module):
        # Every (owner dict, key, object) of the module tree: a replaced parameter, buffer or submodule.
        self._places: List[Tuple[dict, str, object]] = []
        tensors: Dict[int, Tuple[str, torch.Tensor]] = {}
        for prefix, mod in module.named_modules(remove_duplicate=False):
            for kind in ("_modules", "_parameters", "_buffers"):
                owner = getattr(mod, kind)
                for key, obj in owner.items():
                    self._places.append((owner, key, obj))
                    if isinstance(obj, torch.Tensor):
                        tensors.setdefault(id(obj), (f"{prefix}.{key}" if prefix else key, obj))
        self._names = [name for name, _ in tensors.values()]
        self._tensors = [t for _, t in tensors.values()]
        self._signatures = [_signature(t) for t in self._tensors]
        # Sample views grouped by dtype and device: one concatenation and one compare per group. On the
        # CPU the views are numpy arrays over the same memory: numpy concatenates 200 small arrays in
        # ~40 us, torch.cat in ~400 us.
        groups: Dict[tuple, List[Tuple[torch.Tensor, int]]] = {}
        for i, t in enumerate(self._tensors):
            view = _sample_view(t)
            if view is not None:
                groups.setdefault((view.dtype, view.device), []).append((view, i))
        self._samples = []
        for (_, device), group in groups.items():
            views = [v.numpy() if device.type == "cpu" else v for v, _ in group]
            concat = np.concatenate if device.type == "cpu" else torch.cat
            self._samples.append((concat, views, [i for _, i in group], concat(views)))

    def changed(self) -> Optional[str]:
        """None if nothing changed since this watch was made, else what changed (for logs)."""
        for owner, key, obj in self._places:
            if owner.get(key) is not obj:
                return f"{key!r} was replaced"
        try:                                            # the fast path: no inference tensors
            now = [(t._version, t.data_ptr(), t.dtype, t.device) for t in self._tensors]
        except RuntimeError:
            now = [_signature(t) for t in self._tensors]
        if now != self._signatures:
            name, before, after = next(c for c in zip(self._names, self._signatures, now) if c[1] != c[2])
            return self._describe(name, before, after)
        for concat, views, index, before in self._samples:
            now = concat(views)
            if not bool((now == before).all()):
                at = int((now != before).nonzero()[0][0])
                k = 0
                for v, i in zip(views, index):          # the tensor the first changed sample came from
                    k += len(v)
                    if at < k:
                        return f"{self._names[i]} was written through .data"
        return None

    @staticmethod
    def _describe(name: str, before: tuple, now: tuple) -> str:
        (v0, p0, d0, dev0), (v1, p1, d1, dev1) = before, now
        if (d0, dev0) != (d1, dev1):
            return f"{name} moved from {d0} on {dev0} to {d1} on {dev1}"
        if p0 != p1:
            return f"{name} holds new data (e.g. p.data = ...)"
        return f"{name} was written in place (version {v0} -> {v1})"
