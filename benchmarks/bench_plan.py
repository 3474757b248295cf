"""The plan (``rmt-fast plan``) against a measured Engine run on this CPU, and its GPU predictions.

    python benchmarks/bench_plan.py [--layers 2] [--out benchmarks/results/plan.json] [--no-docs]

Validation: the bert-base shape with ``--layers`` encoder layers (2 by default, to stay short on a shared
CPU), bfloat16 and float32, batch 1 and 8. Before each case the CPU is probed (``perfmodel.devices.probe_cpu``), then
the case is predicted and measured (``rmt_fast.bench.measure``: full segments, after a warm-up), and the
predicted/measured ratio of ms per segment is recorded. Predictions: the full 12-layer bert-base shape on the
1080 Ti (float32), A100 80 GB and H200 (bfloat16), labelled predicted. Both tables go into docs/PERF.md
between their markers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

from rmt_fast import files

ROOT = Path(__file__).resolve().parents[1]
VALIDATION = ("<!-- plan-validation:begin -->", "<!-- plan-validation:end -->")
PREDICTED = ("<!-- plan-predicted:begin -->", "<!-- plan-predicted:end -->")
GPU_ROWS = (("1080ti", "float32"), ("a100-80gb", "bfloat16"), ("h200", "bfloat16"))


def validate(layers: int, cases, segments: dict) -> list:
    from rmt_fast.bench import builtin_model, measure
    from rmt_fast.engine import Engine
    from rmt_fast.perfmodel import bert_base, devices, predict
    from rmt_fast.perfmodel import _cpu_fuses_activation

    torch.manual_seed(0)
    model = builtin_model(layers)
    rows = []
    for dtype, batch in cases:
        # Probe right before each measurement: on a shared machine the load changes from minute to minute.
        cpu = devices.probe_cpu(dtypes=("float32", "bfloat16"))
        dims = bert_base(layers, _cpu_fuses_activation(dtype))
        pred = predict(dims, cpu, batch, dtype, segments=segments[batch])
        engine = Engine(model, device="cpu", dtype=dtype)
        got = measure(engine, segments[batch], batch_size=batch)
        rows.append({"dtype": dtype, "batch": batch, "layers": layers, "segments": segments[batch],
                     "predicted_ms_per_segment": pred["ms_per_segment"], "measured_ms_per_segment": got["ms_per_segment"],
                     "ratio": pred["ms_per_segment"] / got["ms_per_segment"], "load_average": os.getloadavg()[0]})
        r = rows[-1]
        print(f"{dtype:>9} B={batch}: predicted {r['predicted_ms_per_segment']:.1f} ms/segment, measured "
              f"{r['measured_ms_per_segment']:.1f}, ratio {r['ratio']:.2f}", flush=True)
    return rows, cpu


def gpu_predictions() -> list:
    from rmt_fast.perfmodel import bert_base, devices, predict
    rows = []
    for name, dtype in GPU_ROWS:
        dev = devices.lookup(name)
        one = predict(bert_base(), dev, 1, dtype)
        best = predict(bert_base(), dev, max(1, one["max_batch"]), dtype)
        rows.append({"device": name, "dtype": dtype, "ms_per_segment_b1": one["ms_per_segment"],
                     "peak_gib_b1": one["peak_bytes"] / 2 ** 30, "max_batch": one["max_batch"],
                     "memory_gib": dev.memory_bytes / 2 ** 30, "seconds_4096_b1": one["seconds_total"],
                     "ms_per_segment_max_batch": best["ms_per_segment"], "source": dev.source})
    return rows


def _replace(text: str, markers, body: str) -> str:
    begin, end = markers
    block = f"{begin}\n{body}\n{end}"
    if begin in text:
        return text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    return text.rstrip() + "\n\n" + block + "\n"


def write_docs(rows, cpu, gpus, path: Path = ROOT / "docs" / "PERF.md") -> None:
    v = ["Measured here (one run on the shared CPU: " + f"{platform.processor() or platform.machine()}, "
         f"{torch.get_num_threads()} threads, torch {torch.__version__}); bert-base shape with {rows[0]['layers']} "
         "encoder layers (short on purpose), full 512-position segments. The CPU's rates come from the probe "
         f"(FFN GEMM float32 {cpu.flops.get('float32', 0) / 1e9:.0f} GFLOP/s, bfloat16 "
         f"{cpu.flops.get('bfloat16', 0) / 1e9:.0f} GFLOP/s; attention float32 "
         f"{cpu.attention_flops.get('float32', 0) / 1e9:.0f}, bfloat16 {cpu.attention_flops.get('bfloat16', 0) / 1e9:.0f}"
         f" GFLOP/s; copy {cpu.bandwidth / 1e9:.1f} GB/s; {cpu.op_overhead_s * 1e6:.1f} us per op, as probed before the"
         " last case; each case is predicted from a probe taken just before it).", "",
         "| dtype | batch | segments x batch | predicted ms/segment | measured ms/segment | predicted / measured "
         "| load average |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        v.append(f"| {r['dtype']} | {r['batch']} | {r['segments']} x {r['batch']} | {r['predicted_ms_per_segment']:.1f} "
                 f"| {r['measured_ms_per_segment']:.1f} | {r['ratio']:.2f} | {r['load_average']:.1f} |")
    p = ["**All figures predicted** by `rmt-fast plan` (bert-base shape, 12 layers, 512 positions, CUDA graphs on), "
         "none measured: spec-sheet peaks at assumed efficiencies (GEMM 0.7, attention 0.4, bandwidth 0.8) and "
         "a 500 MiB CUDA context. Max batch: the largest that fits the card's whole memory.", "",
         "| GPU | dtype | ms/segment, batch 1 (predicted) | 4,096 segments, batch 1 (predicted) | peak GiB, batch 1 "
         "(predicted) | max batch (predicted) | ms/segment at max batch (predicted) |",
         "|---|---|---:|---:|---:|---:|---:|"]
    for g in gpus:
        p.append(f"| {g['device']} ({g['memory_gib']:.0f} GiB) | {g['dtype']} | {g['ms_per_segment_b1']:.2f} | "
                 f"{g['seconds_4096_b1']:.1f} s | {g['peak_gib_b1']:.2f} | {g['max_batch']:,} | "
                 f"{g['ms_per_segment_max_batch']:.3f} |")
    text = path.read_text(encoding="utf-8")
    text = _replace(text, PREDICTED, "\n".join(p))
    text = _replace(text, VALIDATION, "\n".join(v))
    files.write_text(path, text)       # atomic: temp, fsync, rename


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "plan.json"))
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args(argv)
    cases = [(d, b) for d in ("bfloat16", "float32") for b in (1, 8)]
    rows, cpu = validate(args.layers, cases, segments={1: 12, 8: 3})
    gpus = gpu_predictions()
    for g in gpus:
        print(f"{g['device']} {g['dtype']}: predicted {g['ms_per_segment_b1']:.2f} ms/segment, "
              f"{g['seconds_4096_b1']:.1f} s for 4096, max batch {g['max_batch']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cpu": cpu.to_dict(), "validation": rows, "gpu_predicted": gpus}, indent=1))
    if not args.no_docs:
        write_docs(rows, cpu, gpus)
    return 0


if __name__ == "__main__":
    sys.exit(main())
