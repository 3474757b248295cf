"""What a benchmark hands back: the terminal lines, bench.json (rows + the machine, versions and command)
and the plots (bench.png, timeline.png)."""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .. import files, plotting

ROW_KEYS = ("system", "batch_size", "segments", "ms_per_segment", "tokens_per_s", "peak_mib", "memory_measure")


def machine(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "threads": torch.get_num_threads(), "platform": platform.platform(),
            "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def versions() -> dict:
    import transformers

    import rmt_fast
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "rmt_fast": getattr(rmt_fast, "__version__", "unknown")}


def header(extra: dict, device: torch.device, command: str) -> dict:
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "machine": machine(device),
            "versions": versions(), "command": command, **extra}


def outcome(row: dict) -> str:
    stopped = row.get("stopped")
    if stopped:
        said = f"stopped at {stopped['segments']} {stopped.get('unit', 'segments')} ({stopped['reason']})"
        return f"not run: {said} at a shorter length" if stopped.get("not_run") else said
    return f"{row['ms_per_segment']:.1f} ms/segment, {row['tokens_per_s']:,.0f} tokens/s"


def _name(row: dict) -> str:
    return row["system"] + (f" ({row['batching']})" if row.get("batching") else "")


def point_line(row: dict) -> str:
    docs = f", {row['docs_per_s']:.2f} documents/s" if row.get("docs_per_s") else ""
    return (f"{_name(row):<9} batch {row['batch_size']:>3} {row['segments']:>6} segments: "
            f"{outcome(row)}{docs}" + ("" if row["peak_mib"] is None else f", peak {row['peak_mib']:.1f} MiB"))


def table(rows: List[dict]) -> str:
    width = max([9] + [len(_name(r)) for r in rows])
    out = [f"{'system':<{width}} {'batch':>5} {'segments':>8} {'ms/segment':>11} {'tokens/s':>10} {'peak MiB':>9}"]
    for r in rows:
        if r.get("stopped"):
            cells = f"  {outcome(r)}"
        else:
            cells = f"{r['ms_per_segment']:>11.1f} {r['tokens_per_s']:>10,.0f} {r['peak_mib']:>9.1f}"
        out.append(f"{_name(r):<{width}} {r['batch_size']:>5} {r['segments']:>8} {cells}")
    return "\n".join(out)


def speedups(rows: List[dict]) -> List[dict]:
    """The Engine's speed-up over each baseline at every point both finished: baseline ms / Engine ms."""
    engine = {(r["batch_size"], r["segments"]): r for r in rows if r["system"] == "engine" and not r.get("stopped")}
    out = []
    for r in rows:
        e = engine.get((r["batch_size"], r["segments"]))
        if r["system"] != "engine" and e is not None and not r.get("stopped"):
            out.append({"baseline": r["system"], "batch_size": r["batch_size"], "segments": r["segments"],
                        "speedup": r["ms_per_segment"] / e["ms_per_segment"]})
    return out


def mixed_summary(rows: List[dict], mixed: dict) -> str:
    """documents/s of each system on the mixed workload, and the slots' gain over each pad-to-longest."""
    lines = [f"mixed workload: {mixed['n']} documents, {mixed['distribution']}; lengths min {mixed['min']}, "
             f"median {mixed['percentiles']['50']:g}, mean {mixed['mean']}, max {mixed['max']}, "
             f"{mixed['total_segments']} segments in all"]
    for B in sorted({r["batch_size"] for r in rows}):
        at = [r for r in rows if r["batch_size"] == B]
        slots = next(r for r in at if r["batching"] == "slots")
        for r in at:
            lines.append(f"  batch {B}: {_name(r):<30} {outcome(r)}"
                         + (f", {r['docs_per_s']:.3f} documents/s" if r.get("docs_per_s") else "")
                         + f", {r['steps']} steps, rows busy {100 * r['row_utilization']:.0f}%"
                         + (f"; slots {slots['docs_per_s'] / r['docs_per_s']:.2f}x its documents/s"
                            if r is not slots and r.get("docs_per_s") and slots.get("docs_per_s") else ""))
    return "\n".join(lines)


def write_json(path: Path, document: dict) -> None:
    files.write_text(path, json.dumps(document, indent=2))


def _series(rows: List[dict]) -> Dict[tuple, List[dict]]:
    by: Dict[tuple, List[dict]] = {}
    for r in rows:
        by.setdefault((r["system"], r["batch_size"]), []).append(r)
    return by


def plot_bench(rows: List[dict], path: Path, title: str) -> None:
    """Three panels: ms per segment and peak memory against length, the Engine's speed-up per baseline.
    A stopped point is not drawn; the legend says where its series stopped."""
    plt = plotting.pyplot()
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.5))
    for (system, B), series in _series(rows).items():
        done = [r for r in series if not r.get("stopped")]
        stop = next((r for r in series if r.get("stopped")), None)
        label = f"{system}, batch {B}" + (f": {outcome(stop)}" if stop else "")
        x = [r["segments"] for r in done]
        a.plot(x, [r["ms_per_segment"] for r in done], "o-", label=label)
        line, = b.plot(x, [r["peak_mib"] for r in done], "o-", label=label)
        if stop is not None and stop["peak_mib"] is not None:   # measured up to the stop: drawn where it stopped
            b.plot([stop["stopped"]["segments"]], [stop["peak_mib"]], "x", color=line.get_color(), ms=9)
    for (baseline, B), series in _series([dict(s, system=s["baseline"]) for s in speedups(rows)]).items():
        c.plot([s["segments"] for s in series], [s["speedup"] for s in series], "o-",
               label=f"over {baseline}, batch {B}")
    a.set(xscale="log", xlabel="document length (segments)", ylabel="ms per segment", title="time per segment")
    b.set(xscale="log", xlabel="document length (segments)", ylabel="peak MiB above the start",
          title="peak memory (x: a stopped baseline, where it stopped)")
    c.axhline(1.0, color="grey", lw=0.8)
    c.set(xscale="log", xlabel="document length (segments)", ylabel="baseline time / Engine time",
          title="Engine speed-up")
    from matplotlib.ticker import FuncFormatter
    for ax in (a, b, c):
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))   # 16, not 1.6 x 10^1
        ax.set_ylim(bottom=0)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    plotting.savefig(fig, path, dpi=100)


def plot_timeline(timeline: Dict[str, dict], path: Path, title: str) -> None:
    """Memory above the start against segments done, one line per system (and CUDA's reserved too)."""
    plt = plotting.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for system, t in timeline.items():
        label = system + (f" ({t['stopped']})" if t.get("stopped") else "")
        ax.plot(t["segments"], t["allocated_mib"], label=label + (", allocated" if t.get("reserved_mib") else ""))
        if t.get("reserved_mib"):
            ax.plot(t["segments"], t["reserved_mib"], "--", label=label + ", reserved")
    ax.set(xlabel="segments done", ylabel="MiB above the start")
    ax.set_title(title, fontsize=8)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    plotting.savefig(fig, path, dpi=100)


def write_plots(out: Path, rows: List[dict], timeline: Optional[dict], title: str) -> List[Path]:
    written = []
    uniform = [r for r in rows if r.get("workload", "uniform") == "uniform"]
    if uniform:
        plot_bench(uniform, out / "bench.png", title)
        written.append(out / "bench.png")
    if timeline:
        plot_timeline(timeline, out / "timeline.png", "memory through one run\n" + title)
        written.append(out / "timeline.png")
    return written


def plot_lengths(rows: List[dict], path: Path, title: str) -> None:
    """Two panels from rows with tokens, ms_per_segment and peak_mib (benchmarks/bench_driver.py's plot)."""
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
