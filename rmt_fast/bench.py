"""``rmt-fast bench``: the Engine against the reference's way and a tuned baseline, on the user's model
or a built-in shape, on the same documents in one run.

Points (equal-length documents at each length and batch size), a mixed workload (log-uniform lengths:
slots refilled against the reference's pad-to-longest batches) and a memory timeline through one long
run. A baseline past ``--budget-s`` or its memory limit is stopped and reported as stopped, never
extrapolated. The pieces live in ``rmt_fast.benchmark``; this module is the command line.
"""
from __future__ import annotations

import argparse

import torch

from . import plotting
from .benchmark import memory, models, report, runs, systems, workloads
from .benchmark.memory import PeakMemory, rss_bytes as _rss_bytes  # noqa: F401 - public since issue 2
from .benchmark.models import DATA  # noqa: F401 - benchmarks/bench_compat.py reads it
from .benchmark.report import plot_lengths as plot  # noqa: F401 - benchmarks/bench_driver.py draws with it
from .cli_args import check_output_dir, device_name, dtype_name, positive_float, positive_int, positive_int_list


def builtin_model(num_layers: int = 12, num_labels: int = 6, shape: str = "bert-base"):
    """A random-weight model of a built-in shape (bert-base-cased's by default) with ``num_layers``."""
    return models.shape_model(shape, num_layers, num_labels)


def _baselines(text: str):
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in systems.BASELINES + ("none",)]
    if unknown:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(systems.BASELINES)} "
                                         f"(or none), got {text!r}")
    return [n for n in names if n != "none"]


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("bench", help="the Engine against the reference's way: time, memory, workloads")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--model", help="an rmt_fast model folder, or a reference model_best.pth")
    what.add_argument("--shape", choices=sorted(models.SHAPES),
                      help="a built-in shape with random weights (default bert-base)")
    p.add_argument("--backbone-config", help="config.json (or folder) of a reference checkpoint's backbone")
    p.add_argument("--layers", type=positive_int, help="keep this many encoder layers (default: all)")
    p.add_argument("--segments", type=positive_int_list, default=[1, 16, 256, 4096],
                   help="comma-separated document lengths in segments")
    p.add_argument("--batch-sizes", type=positive_int_list, default=[1],
                   help="comma-separated batch sizes (documents side by side)")
    p.add_argument("--batch-size", dest="batch_sizes", type=positive_int_list, help=argparse.SUPPRESS)
    p.add_argument("--baselines", type=_baselines, default=list(systems.BASELINES),
                   help="comma-separated: reference (eager fp32, outputs kept), tuned (SDPA, bf16/fp16), or none")
    p.add_argument("--budget-s", type=positive_float, default=60.0,
                   help="seconds a baseline may take per point before it is stopped")
    p.add_argument("--memory-limit-mib", type=positive_int,
                   help="RSS growth (MiB) at which a baseline is stopped on the CPU (default: 80%% of MemAvailable)")
    p.add_argument("--workload", choices=["uniform", "mixed"], default="uniform",
                   help="uniform: equal-length documents per point; mixed: log-uniform lengths")
    p.add_argument("--docs", type=positive_int, default=64, help="documents of the mixed workload")
    p.add_argument("--max-segments", type=positive_int, default=64, help="longest document of the mixed workload")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights, the documents and the mixed lengths")
    p.add_argument("--timeline", action="store_true", help="also record memory per segment through one run")
    p.add_argument("--timeline-segments", type=positive_int, help="its length (default: the largest --segments)")
    p.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", type=dtype_name, default="bfloat16")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8 GEMMs on the CPU (weights per channel, activations per token; docs/ARCHITECTURE.md)")
    p.add_argument("--attention", default="auto")
    p.add_argument("--max-memory", help="device memory budget, e.g. 10GiB: the Engine's slots are what it holds "
                                         "(recorded in bench.json as max_slots)")
    p.add_argument("--out", default="bench-results", help="folder for bench.json and the plots")
    p.add_argument("--no-plot", action="store_true", help="skip the plots (they need matplotlib)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run, bench_parser=p)


def command_line(args) -> str:
    """The command that repeats this run, every option spelled out (defaults included)."""
    import shlex

    words = ["rmt-fast", "bench"]
    for action in args.bench_parser._actions:
        value = getattr(args, action.dest, None)
        if not action.option_strings or action.help == argparse.SUPPRESS or action.dest == "help" \
                or value in (None, False):
            continue
        words.append(action.option_strings[0])
        if value is not True:
            words.append(",".join(map(str, value)) if isinstance(value, list) else str(value))
    return " ".join(shlex.quote(w) for w in words)


def _load(args):
    if args.model:
        return models.user_model(args.model, args.backbone_config, args.layers)
    if args.backbone_config:
        raise ValueError("--backbone-config goes with --model (a reference checkpoint)")
    return builtin_model(args.layers, shape=args.shape or "bert-base")


def run(args) -> int:
    from tqdm import tqdm

    from .engine import Engine

    out = check_output_dir(args.out, "--out")  # before minutes of compute, not after
    if not args.no_plot:
        plotting.require_matplotlib()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = _load(args)
    cfg = model.config
    engine = Engine(model, device=args.device, dtype=args.dtype, attention=args.attention,
                    quantize=args.quantize, max_memory=args.max_memory)
    if engine.max_slots is not None:
        print(f"--max-memory {args.max_memory}: the Engine holds {engine.max_slots} slots", flush=True)
    device = engine.device
    compared = [systems.EngineSystem(engine)] + [systems.BaselineSystem(n, model, device, engine.dtype)
                                                 for n in args.baselines]
    limit = None
    if device.type == "cpu":
        grow = args.memory_limit_mib * 2**20 if args.memory_limit_mib else int(0.8 * memory.available_bytes())
        limit = memory.rss_bytes() + grow
    limits = runs.Limits(args.budget_s, limit)
    n_points = (len(args.segments) if args.workload == "uniform" else 1) * len(args.batch_sizes)
    per_point = len(compared) + (1 if args.workload == "mixed" else 0)
    bar = tqdm(total=n_points * per_point + (len(compared) if args.timeline else 0), unit="point",
               desc="bench", disable=args.no_progress, dynamic_ncols=True)

    finished = []       # every finished point, kept even when the run is interrupted

    def tick(row):
        if row.get("timeline"):
            stopped = f", {row['stopped']}" if row["stopped"] else ""
            bar.write(f"timeline {row['system']}: {row['segments']:.0f} segments, "
                      f"peak {row['peak_mib']:.1f} MiB{stopped}")
        else:
            finished.append(row)
            bar.write(report.point_line(row))
        bar.update(1)

    name = args.model or args.shape or "bert-base"
    title = f"rmt_fast, {name} ({models.describe(model)}), {str(engine.dtype).replace('torch.', '')}, {device}"
    document = {"meta": report.header({"model": name, "model_shape": models.describe(model),
                                       "dtype": str(engine.dtype), "quantize": args.quantize, "attention": args.attention,
                                       "max_memory": args.max_memory, "max_slots": engine.max_slots,
                                       "budget_s": args.budget_s, "seed": args.seed}, device, command_line(args))}
    timeline = None
    try:
        if args.workload == "uniform":
            runs.points(compared, cfg, args.segments, args.batch_sizes, device, limits, gen, tick)
        else:
            _, lengths = runs.mixed(compared, cfg, args.docs, args.max_segments, args.seed,
                                       args.batch_sizes, device, limits, gen, tick)
            document["mixed"] = {"distribution": f"log-uniform on [1, {args.max_segments}] segments, seed {args.seed}",
                                 "lengths": lengths, **workloads.describe_lengths(lengths)}
        if args.timeline:
            n = args.timeline_segments or max(args.segments)
            timeline = runs.timeline(compared, cfg, n, args.batch_sizes[0], device, limits, gen, tick)
    finally:
        bar.close()
        rows = finished
        document.update(rows=rows, speedups=report.speedups(rows), timeline=timeline)
        report.write_json(out / "bench.json", document)   # whatever finished is kept, even on Ctrl-C
    print(report.table(rows))
    if args.workload == "mixed":
        print(report.mixed_summary(rows, document["mixed"]))
    written = [out / "bench.json"]
    if not args.no_plot:
        written += report.write_plots(out, rows, timeline, title)
    print("wrote " + ", ".join(str(w) for w in written))
    return 0
