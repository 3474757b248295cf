"""The plan's linear layers: oneDNN pre-packed weights on the CPU, ``F.linear`` everywhere else.

On the CPU, ``F.linear`` re-lays the weight out for oneDNN/MKL on every call; packing it once
(``torch.ops.mkldnn._reorder_linear_weight``) and calling ``_linear_pointwise`` skips that pass, and
lets the FFN's activation run inside the GEMM (a oneDNN post-op: the pre-activation is never
rounded to the compute dtype nor written out). Measured on this project's CPUs: 10-18% off the
GEMM time of a bert-base segment, GELU fused saves its own pass (docs/PERF.md).

``Linear.packed`` says which path a layer took; ``packing_available(device, dtype)`` why not.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F

# HF activation name -> (oneDNN post-op, its algorithm). Others run unfused after the GEMM.
FUSED_ACTIVATIONS = {
    "gelu": ("gelu", "none"),              # exact (erf) GELU, BERT's
    "gelu_new": ("gelu", "tanh"),
    "gelu_pytorch_tanh": ("gelu", "tanh"),
    "relu": ("relu", ""),
}
PACKED_DTYPES = (torch.float32, torch.bfloat16)


def _ops():
    return getattr(torch.ops, "mkldnn", None)


@lru_cache(maxsize=None)
def _probe(dtype: torch.dtype) -> Optional[str]:
    """None if the packed path runs and agrees with F.linear on a small problem, else why not."""
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(3, 5, 40, generator=g).to(dtype)
        w = torch.randn(24, 40, generator=g).to(dtype)
        b = torch.randn(24, generator=g).to(dtype)
        y = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, None), b,
                                               "none", [], "")
        ref = F.linear(x.double(), w.double(), b.double())
    except (RuntimeError, AttributeError, NotImplementedError) as e:
        return f"oneDNN packed linear failed: {str(e).splitlines()[0]}"
    tol = 1e-4 if dtype == torch.float32 else 0.1
    if y.shape != ref.shape or not torch.allclose(y.double(), ref, atol=tol, rtol=tol):
        return "oneDNN packed linear disagrees with F.linear"
    return None


def packing_available(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None if weights can be pre-packed for ``device``/``dtype``, else the reason."""
    if torch.device(device).type != "cpu":
        return f"only on the CPU (device {device})"
    if dtype not in PACKED_DTYPES:
        return f"only float32/bfloat16 (dtype {dtype})"
    ops = _ops()
    if not torch.backends.mkldnn.is_available() or ops is None or not hasattr(ops, "_reorder_linear_weight"):
        return "this torch build has no oneDNN (mkldnn) packed linear"
    return _probe(dtype)


class Linear:
    """y = act(x @ weight.T + bias), with ``act`` a Hugging Face activation name or None.

    weight: [N, K], bias: [N], already on the plan's device and in its dtype.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, act: Optional[str] = None,
                 pack: bool = False):
        self.out_features, self.in_features = weight.shape
        self.packed = pack
        self.bias = bias
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, None) if pack else weight
        fused = pack and act in FUSED_ACTIVATIONS
        self._post = FUSED_ACTIVATIONS[act] if fused else ("none", "")
        self._act = None
        if act and not fused:
            from transformers.activations import ACT2FN
            self._act = ACT2FN[act]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            attr, algorithm = self._post
            y = torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.weight, self.bias, attr, [], algorithm)
        else:
            y = F.linear(x, self.weight, self.bias)
        return y if self._act is None else self._act(y)
