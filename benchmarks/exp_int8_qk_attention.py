"""Experiment (issue 18): int8 for q k^T only, the probabilities and v unquantized.

attention_int8 (csrc/cpu/attention_int8.cpp) quantizes q, k, v and the probabilities (uint8 steps of 1/255
of the row max) and flips more long documents than the int8 GEMMs alone. This runs, in every layer but the
last, attention whose scores come from int8 q and k (per (token, head) scales, exact integer sums) and
whose softmax and p v stay in float32, on top of the int8 Engine (int8 GEMMs, bf16 elsewhere) and of the
float32 Engine, on the shipped model's Detect & Memorize test documents (seed 1234, as bench_int8.py
drift); prints agreement with float32. A torch model of the arithmetic, not a kernel: it answers whether
an int8 q k^T keeps the drift before one is written.
    OMP_NUM_THREADS=2 python benchmarks/exp_int8_qk_attention.py 1024 100
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_int8 import drift_documents, flips, make_engine  # noqa: E402

from rmt_fast.engine import plan as plan_mod  # noqa: E402


def quantize_rows(x: torch.Tensor):
    """x [B, T, H, D] -> (integers as float32, scale [B, T, H, 1]): symmetric per (token, head)."""
    xf = x.float()
    s = xf.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127
    return (xf / s).round(), s


def qk_int8_attention(q, k, v, key_lengths, scale):
    """q [B, Tq, H, D], k and v [B, Tk, H, D] -> [B, Tq, H * D]; only q k^T in int8 (sums exact in float32:
    at most 127^2 * D < 2^24 for D <= 1040)."""
    qi, sq = quantize_rows(q)
    ki, sk = quantize_rows(k)
    scores = torch.einsum("bthd,bjhd->bhtj", qi, ki) * (sq.permute(0, 2, 1, 3) * sk.permute(0, 2, 3, 1)) * scale
    if key_lengths is not None:
        mask = torch.arange(k.shape[1])[None, :] < key_lengths[:, None]
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, -1).nan_to_num(0.0)
    out = torch.einsum("bhtj,bjhd->bthd", p, v.float())
    return out.reshape(q.shape[0], q.shape[1], -1).to(q.dtype)


def main() -> None:
    n_seg, n_docs = int(sys.argv[1]), int(sys.argv[2])
    model, ids, labels = drift_documents(n_seg, n_docs)
    ref = make_engine(model, "float32").classify(ids, batch_size=n_docs)
    original = plan_mod.InferencePlan._attend

    def attend(self, index, q, k, v, key_lengths):                 # the last layer keeps its attention
        if index == len(self.layers) - 1:
            return original(self, index, q, k, v, key_lengths)
        return qk_int8_attention(q, k, v, key_lengths, 1.0)       # the plan folds the scale into q

    plan_mod.InferencePlan._attend = attend
    for variant in ("int8", "float32"):
        logits = make_engine(model, variant).classify(ids, batch_size=n_docs)
        print(f"{n_seg} seg, {variant} + q k^T int8: {flips(logits, ref, labels)}", flush=True)


if __name__ == "__main__":
    main()
