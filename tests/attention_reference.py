"""The one float64 attention reference of the tests and benchmarks (the oracle of every attention path).

Benchmarks import it with ``sys.path.insert(0, <repo>/tests)``.
"""
import math

import torch


def attention_reference(q, k, v, key_lengths=None, scale=None):
    """softmax(scale * q k^T + key padding mask) v, computed in float64.

    q: (B, Tq, heads, D); k, v: (B, Tk, heads, D), any dtype, device and strides; key_lengths: None
    or (B,) integers, keys at positions >= key_lengths[b] masked (a length past Tk masks nothing);
    scale: None means 1/sqrt(D). A query row with no key gives zeros.
    Returns (B, Tq, heads * D) float64 on q's device.
    """
    B, Tq, heads, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qd, kd, vd = (x.double().transpose(1, 2) for x in (q, k, v))              # [B, heads, T, D]
    s = (qd @ kd.transpose(-1, -2)) * scale                                    # [B, heads, Tq, Tk]
    if key_lengths is not None:
        keep = torch.arange(k.shape[1], device=q.device)[None, :] < key_lengths.to(q.device)[:, None]
        s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # an all -inf row is NaN in torch; defined as 0 here
    return (p @ vd).transpose(1, 2).reshape(B, Tq, heads * D)
