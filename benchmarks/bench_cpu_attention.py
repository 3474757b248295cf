"""The fused CPU attention op (attention backend 'cpp') against torch SDPA and the matmul backend.

    python benchmarks/bench_cpu_attention.py                 # the full table (a few minutes)
    python benchmarks/bench_cpu_attention.py --quick         # bf16 + fp32, B=1, T=512 only

q, k, v are views of one fused QKV tensor [B, T, 3, heads, D], as the engine passes them. Each case
times the backends interleaved (cpp, sdpa, matmul, cpp, sdpa, ...), best of --reps rounds of
--inner calls each, so that the ratios come from one run on a noisy shared machine. GFLOP/s counts
the two products, 4 * B * heads * Tq * Tk_valid * D flops. Runs at 1 and 2 threads
(--threads to change). Cases: full and padded (key lengths T/2 and T, alternating over the batch),
all query rows or only the first 11 (the engine's last layer).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from rmt_fast import _ext  # noqa: E402
from rmt_fast.engine import backends  # noqa: E402


def make_inputs(B, T, heads, D, dtype, padded, tq):
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, T, 3, heads, D, generator=g).to(dtype)
    q, k, v = qkv[:, :tq, 0], qkv[:, :, 1], qkv[:, :, 2]
    kl = None
    if padded:
        kl = torch.tensor([T // 2 if b % 2 == 0 else T for b in range(B)], dtype=torch.int64)
    return q, k, v, kl


def flops(B, T, heads, D, tq, kl):
    keys = kl.sum().item() if kl is not None else B * T
    return 4.0 * heads * tq * keys * D


def time_interleaved(fns, reps, inner):
    best = {name: math.inf for name in fns}
    for fn in fns.values():  # warm-up (brgemm kernels are generated on first use)
        fn()
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / inner)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--inner", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--no-matmul", action="store_true", help="skip the (slow) matmul backend")
    args = ap.parse_args()
    if _ext.attention_why_unavailable() is not None:
        sys.exit(f"the cpp backend is unavailable: {_ext.attention_why_unavailable()}")

    heads, D = 12, 64
    if args.quick:
        cases = [(1, 512, False, 512)]
        dtypes = [torch.bfloat16, torch.float32]
    else:
        cases = []
        for B in (1, 8):
            for T in (512, 522):
                for padded in (False, True):
                    for tq in (T, 11):
                        cases.append((B, T, padded, tq))
        dtypes = [torch.bfloat16, torch.float32]
    names = ["cpp", "sdpa"] + ([] if args.no_matmul else ["matmul"])
    print(f"torch {torch.__version__}, heads {heads}, D {D}; best of {args.reps} x {args.inner}, "
          "interleaved; ms (GFLOP/s)")
    header = f"{'thr':>3} {'dtype':>8} {'B':>2} {'T':>4} {'keys':>6} {'Tq':>4} | " + " | ".join(
        f"{n:>15}" for n in names) + " | sdpa/cpp" + ("  matmul/cpp" if "matmul" in names else "")
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(header)
        for dtype in dtypes:
            for B, T, padded, tq in cases:
                q, k, v, kl = make_inputs(B, T, heads, D, dtype, padded, tq)
                fns = {
                    "cpp": lambda: backends.attention("cpp", q, k, v, kl, scale=1.0 / 8),
                    "sdpa": lambda: backends.attention("sdpa", q, k, v, kl, scale=1.0 / 8),
                    "matmul": lambda: backends.attention("matmul", q, k, v, kl, scale=1.0 / 8),
                }
                fns = {n: fns[n] for n in names}
                best = time_interleaved(fns, args.reps, args.inner)
                fl = flops(B, T, heads, D, tq, kl)
                cells = " | ".join(f"{best[n] * 1e3:7.3f} ({fl / best[n] / 1e9:5.0f})" for n in names)
                ratio = f" | {best['sdpa'] / best['cpp']:7.2f}x"
                if "matmul" in names:
                    ratio += f"  {best['matmul'] / best['cpp']:9.2f}x"
                keys = "pad" if padded else "full"
                dt = str(dtype).replace("torch.", "")
                print(f"{threads:>3} {dt:>8} {B:>2} {T:>4} {keys:>6} {tq:>4} | {cells}{ratio}", flush=True)
                rows.append((threads, dt, B, T, keys, tq, best))
    return rows


if __name__ == "__main__":
    main()
