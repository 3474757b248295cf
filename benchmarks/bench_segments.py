"""Per-segment time and peak memory: the reference's way, the tuned baseline, and the Engine, in one run.

  (a) reference: the reference's loop — HF BERT called per segment with inputs_embeds, eager attention,
      float32, output_hidden_states=True and every segment's outputs kept;
  (b) tuned baseline: the same loop with SDPA attention, the model cast to bfloat16, inference mode,
      outputs not kept;
  (c) Engine float32;  (d) Engine bfloat16;
plus the floor: the full model's matmul FLOPs per segment at the bfloat16 GEMM rate measured in this run
(at the GEMM shape of each batch size).

bert-base-cased shape (12 layers, hidden 768), random weights, full segments of 499 text tokens. The
baselines' loop is rmt_fast.baselines (shared with `rmt-fast bench`, which also runs mixed lengths).

  python benchmarks/bench_segments.py [--segments 3] [--batch-sizes 1,8] [--layers 12] [--device cpu]
                                      [--attention auto|sdpa,matmul,triton] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from rmt_fast import Engine
from rmt_fast.baselines import reference_loop
from rmt_fast.bench import PeakMemory, builtin_model


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def gemm_rate(dtype=torch.bfloat16, reps=10, trials=3, device="cpu", rows=512) -> float:
    """The GEMM rate of a bert-base FFN matmul ([rows, 768] x [768, 3072]), FLOP/s: the best of
    ``trials`` timings (a shared machine's noise only ever slows a timing down, so the best is the
    strictest floor)."""
    a = torch.randn(rows, 768, dtype=dtype, device=device)
    b = torch.randn(768, 3072, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(trials):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * rows * 768 * 3072 * reps / best


def segment_flops(layers, T=512, H=768, F=3072) -> float:
    per_layer = 2 * T * (3 * H * H + H * H + 2 * H * F) + 2 * 2 * T * T * H
    return layers * per_layer + 2 * H * H  # + pooler


def timed(fn, batch, n_segments, device="cpu"):
    fn["warm"]()
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        fn["run"]()
        _sync(device)
        dt = time.perf_counter() - t0
    return {"ms_per_segment": 1000 * dt / (n_segments * batch), "peak_mib": mem.peak / 2**20}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--segments", type=int, default=3)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--skip-reference", action="store_true", help="leave out (a), the slowest")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--attention", default="auto",
                    help="comma-separated backends for the Engine rows (e.g. sdpa,matmul,triton)")
    ap.add_argument("--ablate-packing", action="store_true",
                    help="also time the Engine rows with F.linear instead of oneDNN pre-packed weights")
    ap.add_argument("--out", default="benchmarks/results/segments.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = builtin_model(args.layers)
    cfg = model.config
    dev = args.device
    backends = args.attention.split(",")
    rows = []
    for B in [int(b) for b in args.batch_sizes.split(",")]:
        rate = gemm_rate(device=dev, rows=512 * B)  # the floor's rate at this batch's GEMM shape
        floor_ms = 1000 * segment_flops(args.layers) / rate
        docs = [torch.randint(1000, cfg.vocab_size, (args.segments * cfg.segment_size,)) for _ in range(B)]
        warm = [d[:cfg.segment_size] for d in docs]
        engines = {}
        for att in backends:
            tag = "" if len(backends) == 1 else f", {att}"
            engines[f"(c) Engine float32{tag}"] = Engine(model, device=dev, dtype=torch.float32, attention=att)
            engines[f"(d) Engine bfloat16{tag}"] = Engine(model, device=dev, dtype=torch.bfloat16, attention=att)
        if args.ablate_packing:  # not counted as (c)/(d) in the ratios: the row names start with "  "
            for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
                engines[f"  Engine {name}, {backends[0]}, weights unpacked"] = Engine(
                    model, device=dev, dtype=dt, attention=backends[0], packed_weights=False)
        cases = {}
        if not args.skip_reference:
            cases["(a) reference (eager fp32, outputs kept)"] = {
                "warm": reference_loop(model, warm, torch.float32, True, "eager", dev),
                "run": reference_loop(model, docs, torch.float32, True, "eager", dev)}
        cases["(b) tuned baseline (SDPA, bf16)"] = {
            "warm": reference_loop(model, warm, torch.bfloat16, False, "sdpa", dev),
            "run": reference_loop(model, docs, torch.bfloat16, False, "sdpa", dev)}
        for name, e in engines.items():
            cases[name] = {"warm": lambda e=e: e.classify(warm, batch_size=B),
                           "run": lambda e=e: e.classify(docs, batch_size=B)}
        with torch.inference_mode():
            for name, fn in cases.items():
                r = timed(fn, B, args.segments, dev)
                rows.append({"case": name, "batch": B, "floor_ms": floor_ms, **r})
                print(f"batch {B:>2}  {name:<42} {r['ms_per_segment']:>9.1f} ms/segment "
                      f"{r['peak_mib']:>8.1f} MiB peak", flush=True)
        print(f"batch {B:>2}  {'floor (matmul FLOPs at measured bf16 rate)':<42} {floor_ms:>9.1f} ms/segment")
    by = {}
    for r in rows:  # the fastest row of each case letter (several attention backends may be timed)
        key = (r["case"][:3], r["batch"])
        by[key] = min(by.get(key, float("inf")), r["ms_per_segment"])
    floors = {r["batch"]: r["floor_ms"] for r in rows}
    print("\nratios (same run; the best Engine row of each kind):")
    for B in sorted({r["batch"] for r in rows}):
        d = by[("(d)", B)]
        parts = [f"(b)/(d) {by[('(b)', B)] / d:.2f}x", f"(d)/floor {d / floors[B]:.2f}x"]
        if ("(a)", B) in by:
            parts += [f"(a)/(d) {by[('(a)', B)] / d:.2f}x", f"(a)/(c) {by[('(a)', B)] / by[('(c)', B)]:.2f}x"]
        print(f"batch {B:>2}  " + ", ".join(parts))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "layers": args.layers,
            "segments": args.segments, "device": dev,
            "device_name": torch.cuda.get_device_name(dev) if torch.device(dev).type == "cuda" else None}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
