"""``rmt-fast bench``: per-segment throughput and peak memory as the input grows, on a built-in model.

The built-in model has bert-base-cased's shape (rmt_fast/data/bert-base-cased/config.json) with random
weights: speed and memory do not depend on the weights' values.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import torch

from . import files, plotting
from .cli_args import check_output_dir, positive_int, positive_int_list

DATA = Path(__file__).resolve().parent / "data"


def builtin_model(num_layers: int = 12, num_labels: int = 6):
    from transformers import BertConfig

    from .config import RMTConfig
    from .model import RMTForSequenceClassification

    bconf = BertConfig.from_json_file(str(DATA / "bert-base-cased" / "config.json"))
    bconf.num_hidden_layers = num_layers
    cfg = RMTConfig(vocab_size=bconf.vocab_size, num_mem_tokens=10, input_size=512, num_labels=num_labels)
    return RMTForSequenceClassification.from_configs(cfg, bconf).eval()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory above the level at entry: the CUDA allocator's peak on a GPU, sampled RSS on the CPU."""

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device, self.interval, self.peak = torch.device(device), interval, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = _rss_bytes()
            self._max = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._max = max(self._max, _rss_bytes())
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, _rss_bytes()) - self._base
        return False


def measure(engine, n_segments: int, batch_size: int = 1, progress: bool = False) -> dict:
    """Classify ``batch_size`` random documents of exactly ``n_segments`` full segments each."""
    cfg = engine.config
    n_tokens = n_segments * cfg.segment_size
    docs = [torch.randint(1000, cfg.vocab_size, (n_tokens,)) for _ in range(batch_size)]
    engine.classify([d[: cfg.segment_size] for d in docs], batch_size=batch_size)  # warm-up
    with PeakMemory(engine.device) as mem:
        t0 = time.perf_counter()
        engine.classify(docs, batch_size=batch_size, progress=progress)
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        seconds = time.perf_counter() - t0
    return {"segments": n_segments, "tokens": n_tokens, "batch_size": batch_size, "seconds": seconds,
            "ms_per_segment": 1000 * seconds / (n_segments * batch_size),
            "segments_per_s": n_segments * batch_size / seconds, "peak_mib": mem.peak / 2**20}


def plot(rows, path: Path, title: str) -> None:
    plt = plotting.pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    x = [r["tokens"] for r in rows]
    a.plot(x, [r["ms_per_segment"] for r in rows], "o-")
    a.set(xscale="log", xlabel="input length (tokens)", ylabel="ms per segment", title="time per segment",
          ylim=(0, 1.2 * max(r["ms_per_segment"] for r in rows)))
    b.plot(x, [r["peak_mib"] for r in rows], "o-")
    b.set(xscale="log", xlabel="input length (tokens)", ylabel="peak memory above start (MiB)",
          title="peak memory", ylim=(0, max(1.0, 1.5 * max(r["peak_mib"] for r in rows))))
    fig.suptitle(title)
    fig.tight_layout()
    plotting.savefig(fig, path, dpi=100)


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("bench", help="per-segment time and peak memory at growing lengths (built-in model)")
    p.add_argument("--segments", type=positive_int_list, default=[1, 16, 256, 4096],
                   help="comma-separated lengths in segments")
    p.add_argument("--layers", type=positive_int, default=12, help="encoder layers of the built-in bert-base shape")
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8 GEMMs on the CPU (weights per channel, activations per token; docs/ARCHITECTURE.md)")
    p.add_argument("--attention", default="auto")
    p.add_argument("--out", default="bench-results", help="folder for bench.json and bench.png")
    p.add_argument("--no-plot", action="store_true", help="skip bench.png (needs matplotlib)")
    p.set_defaults(func=run)


def run(args) -> int:
    from .engine import Engine

    out = check_output_dir(args.out, "--out")  # before minutes of compute, not after
    if not args.no_plot:
        plotting.require_matplotlib()
    torch.manual_seed(0)
    engine = Engine(builtin_model(args.layers), device=args.device, dtype=args.dtype, attention=args.attention,
                    quantize=args.quantize)
    rows = []
    print(f"{'segments':>9} {'tokens':>10} {'ms/segment':>11} {'segments/s':>11} {'peak MiB':>9}")
    for n in args.segments:
        r = measure(engine, n, args.batch_size, progress=True)
        rows.append(r)
        print(f"{r['segments']:>9} {r['tokens']:>10} {r['ms_per_segment']:>11.1f} {r['segments_per_s']:>11.2f} "
              f"{r['peak_mib']:>9.1f}", flush=True)
    meta = {"device": str(engine.device), "dtype": str(engine.dtype), "quantize": args.quantize, "layers": args.layers,
            "batch_size": args.batch_size, "torch": torch.__version__}
    files.write_text(out / "bench.json", json.dumps({"meta": meta, "rows": rows}, indent=2))
    written = [out / "bench.json"]
    if not args.no_plot:
        plot(rows, out / "bench.png", f"rmt_fast, bert-base shape, {engine.dtype}, {engine.device}, "
                                      f"batch {args.batch_size}")
        written.append(out / "bench.png")
    print("wrote " + " and ".join(str(w) for w in written))
    return 0
