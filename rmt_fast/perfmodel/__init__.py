"""``rmt-fast plan``: predicted time per segment, peak device memory and the largest batch that fits.

``devices`` knows what a device can do (spec sheets, a CPU probe, the present GPU); ``estimate`` turns the
Engine's op list and buffers into time and memory. Every figure is a prediction until measured.
"""
from __future__ import annotations

import json
import re
import sys

from .devices import SPECS, DeviceSpec, resolve
from .estimate import Dims, bert_base, dims_from_model_dir, max_batch, memory_parts, op_list, peak_bytes, predict

__all__ = ["Dims", "DeviceSpec", "SPECS", "bert_base", "dims_from_model_dir", "max_batch", "memory_parts",
           "op_list", "peak_bytes", "predict", "resolve", "parse_size", "add_cli"]

_DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16", "half": "float16"}
_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_size(text, name: str = "--max-memory") -> int:
    """'10GiB', '500 MB', '1.5e9' or a positive int -> bytes; errors name ``name``."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kmgt]i?b|b)?\s*", str(text).lower())
    try:
        size = int(float(m.group(1)) * _UNITS[m.group(2) or ""]) if m and not isinstance(text, bool) else 0
    except ValueError:          # '1.2.3'
        size = 0
    if size < 1:
        raise ValueError(f"{name} {text!r}: expected a positive size such as 10GiB, 500MB or 1e9")
    return size


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("plan", help="predict ms/segment, peak memory and the largest batch on a device",
                              description=__doc__.splitlines()[0])
    p.add_argument("--device", required=True,
                   help=f"cpu (probed), cuda (the present GPU) or a spec-table name: {', '.join(SPECS)}")
    p.add_argument("--model", help="an rmt_fast model folder (default: the built-in bert-base shape)")
    p.add_argument("--layers", type=int, help="encoder layers of the built-in bert-base shape (default 12)")
    p.add_argument("--batch", type=int, default=1, help="slots (documents side by side)")
    p.add_argument("--dtype", default="bfloat16", help="float32, bfloat16 or float16")
    p.add_argument("--segments", type=int, default=4096, help="segments per document (default 4096)")
    p.add_argument("--max-memory", help="device memory budget for --batch search, e.g. 10GiB (default: all)")
    p.add_argument("--no-graphs", action="store_true", help="CUDA: predict eager steps (no CUDA graphs)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        dtype = _DTYPES.get(str(args.dtype).lower())
        if dtype is None:
            raise ValueError(f"--dtype {args.dtype!r}: choose float32, bfloat16 or float16")
        if args.model and args.layers:
            raise ValueError("--layers applies to the built-in shape only; leave it out with --model")
        if args.layers is not None and args.layers < 1:
            raise ValueError("--layers must be positive")
        budget = parse_size(args.max_memory) if args.max_memory else None
        dev = resolve(args.device)
        fused = dev.kind == "cpu" and _cpu_fuses_activation(dtype)
        dims = dims_from_model_dir(args.model, fused) if args.model else bert_base(args.layers or 12, fused)
        out = predict(dims, dev, args.batch, dtype, args.segments, budget, graphs=False if args.no_graphs else None)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"rmt-fast plan: {e}", file=sys.stderr)
        return 2
    out["device_spec"] = dev.to_dict()
    if args.json:
        print(json.dumps(out))
        return 0
    gib = 2 ** 30
    print(f"{dev.name}: {dtype}, batch {args.batch}, {dims.layers} layers, {dims.input_size} positions "
          f"({'measured rates' if dev.measured else 'spec sheet: ' + dev.source})")
    print(f"  predicted {out['ms_per_segment']:.3f} ms/segment ({out['ms_per_step']:.3f} ms per step of "
          f"{args.batch}); {args.segments} segments: {out['seconds_total']:.1f} s")
    print(f"  predicted peak device memory {out['peak_bytes'] / gib:.2f} GiB; largest batch within "
          f"{out['max_memory'] / gib:.1f} GiB: {out['max_batch']}")
    for name, n in out["memory_parts"].items():
        print(f"    {name:<28} {n / 2 ** 20:10.1f} MiB")
    return 0


def _cpu_fuses_activation(dtype: str) -> bool:
    import torch

    from ..engine.linear import packing_available
    return dtype in ("float32", "bfloat16") and packing_available(torch.device("cpu"), getattr(torch, dtype)) is None
