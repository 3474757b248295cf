"""The GPU check: one call on a lent GPU machine gives the whole verdict (issue 12).

    bash benchmarks/gpu_check.sh                  # on the GPU machine, from the repository root
    GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh   # or --dry-run: the same driver on a CPU, tiny sizes

Steps run in the issue's priority order, correctness first: (a) install, (b) the extension's CUDA ops,
(c) the Triton kernel natively, (d) the Engine on CUDA against the CPU oracle, (e) flat VRAM, (f) the
benchmarks. Each step is a subprocess (or a few side by side: pytest shards) with its own timeout; the
timeouts add up to less than the budget, and a step never runs past what is left of it. A failing or
timed-out step is recorded and the next one runs. Output is unbuffered and echoed as it comes.

What comes back (the device tool returns at most 8 files): ``$OUT`` (else benchmarks/results/gpu_check)
holds exactly three, each rewritten atomically after every step, so a run cut short keeps what it had:
  summary.txt   the table (steps, then the issue's targets), also printed last
  results.json  every number: each step's status, time, and data (pytest counts and recorded properties,
                or the JSON the step body wrote)
  logs.tgz      one log per step

This file uses the standard library only: it runs before anything is installed. Step bodies that
measure live in ``gpu_steps.py``; the tests they run are tests/test_*.py.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, List, Optional, Union

import gpu_targets

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
BUDGET_S = 418           # issue 12: the check finishes within 7 minutes (420 s)
FINISH_RESERVE_S = 8     # kept back from every step for the summary and the archive
OUT_FILES = ("summary.txt", "results.json", "logs.tgz")
# pytest processes side by side: each compiles its Triton variants on one core (the H200 machine has 16)
SHARDS = max(2, min(14, (os.cpu_count() or 4) - 2))

Commands = Union[List[List[str]], str]   # argv lists to run side by side, or why the step is skipped


@dataclass
class Context:
    python: str
    dry_run: bool
    scratch: Path                         # logs and step JSON; never in $OUT (only 8 files come back)
    env: dict = field(default_factory=dict)   # set by earlier steps (the install's fallback path)


@dataclass
class Step:
    name: str
    letter: str                           # the item: a-f (priority order)
    title: str
    timeout_s: int
    commands: Callable[[Context], Commands]
    pytest: bool = False                  # parse junit XML into counts and recorded properties


# -- the steps ------------------------------------------------------------------------------------

def _body(name: str, *args: str) -> Callable[[Context], Commands]:
    """A step body from gpu_steps.py; it writes its numbers to $GPU_CHECK_JSON as it goes."""
    def commands(ctx: Context) -> Commands:
        dry = ["--dry-run"] if ctx.dry_run else []
        return [[ctx.python, str(BENCH / "gpu_steps.py"), name, *dry, *args]]
    return commands


def _pytest(files: List[str], *, k: Optional[str] = None, shards: int = 1,
            cuda_only: bool = False) -> Callable[[Context], Commands]:
    """pytest on the GPU, natively (no Triton interpreter), in ``shards`` processes side by side."""
    def commands(ctx: Context) -> Commands:
        if ctx.dry_run:
            return "needs a CUDA GPU (dry run)"
        base = [ctx.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "pytest_shard", *files]
        if k:
            base += ["-k", k]
        if cuda_only:
            base.append("--cuda-only")
        return [base + [f"--shard={i}/{shards}"] for i in range(shards)] if shards > 1 else [base]
    return commands


def _attention_bench(ctx: Context) -> Commands:
    if ctx.dry_run:
        return "needs a CUDA GPU (dry run)"
    return [[ctx.python, str(BENCH / "bench_attention.py"), "--cudagraph", "--rep", "40",
             "--out", str(ctx.scratch / "attention_bench.json")]]


STEPS: List[Step] = [
    Step("env", "a", "versions, GPU, tf32 switches", 10, _body("env")),
    Step("install", "a", "pip install -e . with the CUDA extension (fallbacks say why)", 100, _body("install")),
    Step("ext_ops", "b", "rmt_fast._C's CUDA ops against their torch twins", 20,
         _pytest(["tests/test_extension_embed.py", "tests/test_extension_memory_write.py", "tests/test_extension.py"],
                 k="cuda", shards=4), pytest=True),
    Step("triton", "c", "the Triton kernel natively: every dtype, padded/full, query subsets", 48,
         _pytest(["tests/test_triton_attention.py"], shards=SHARDS), pytest=True),
    Step("engine", "d", "the Engine on CUDA against the CPU float32 oracle; bf16 Triton+graphs", 42,
         _pytest(["tests/test_gpu_engine.py"], k="not vram", shards=4), pytest=True),
    Step("driver", "d", "graph replay, capture, feeder on CUDA (test_graphs, test_feeder)", 28,
         _pytest(["tests/test_graphs.py", "tests/test_feeder.py"], shards=4, cuda_only=True), pytest=True),
    Step("vram", "e", "flat VRAM 16 -> 4096 segments, B=1/8, graphs on/off, three measures", 40,
         _pytest(["tests/test_gpu_engine.py"], k="vram"), pytest=True),
    Step("bench", "f", "ms/segment at B=1/8/32: reference, tuned baseline, Engine eager/graphs", 42,
         _body("bench")),
    Step("attention_bench", "f", "Triton attention against SDPA flash at the Engine's shapes", 20,
         _attention_bench),
    Step("long_run", "f", "4,096 segments (2,043,904 tokens) at B=1: time and peak VRAM", 20, _body("long_run")),
    Step("plan_vs_measured", "f", "rmt-fast plan's predictions next to the measured rows (issue 21)", 10,
         _body("plan_vs_measured")),
    # issue 16: the GTX 1080 Ti's run emulated (11 GiB cap, float32, the attention an sm_61 device gets)
    Step("pascal_budget", "f", "1080 Ti emulated: 11 GiB cap, fp32, no Triton, 4,096 segments; max_memory=10GiB",
         30, _body("pascal_budget")),
]


# -- running one step -----------------------------------------------------------------------------

def _pump(stream, log, prefix: str, lock: threading.Lock) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace")
        log.write(line)
        log.flush()
        with lock:
            sys.stdout.write(prefix + line)
            sys.stdout.flush()


def _kill(proc: subprocess.Popen) -> None:
    """The whole process group (pytest's children, compile workers), TERM first, then KILL."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_commands(cmds: List[List[str]], limit_s: float, env: dict, logs: List[Path]) -> tuple:
    """Run ``cmds`` side by side under one deadline; (return codes, timed out?). Output to ``logs``."""
    lock = threading.Lock()
    procs, pumps, files = [], [], []
    for i, cmd in enumerate(cmds):
        f = open(logs[i], "w", encoding="utf-8")
        f.write("$ " + " ".join(cmd) + "\n")
        files.append(f)
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        prefix = f"[{i}/{len(cmds)}] " if len(cmds) > 1 else ""
        t = threading.Thread(target=_pump, args=(proc.stdout, f, prefix, lock), daemon=True)
        t.start()
        procs.append(proc)
        pumps.append(t)
    deadline = time.monotonic() + limit_s
    timed_out = False
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            break
    if timed_out:
        for proc in procs:
            if proc.poll() is None:
                _kill(proc)
    for t in pumps:
        t.join(5)
    for f in files:
        f.close()
    return [p.returncode for p in procs], timed_out


def junit_data(paths: List[Path]) -> dict:
    """Counts, failing tests (with the first line of why) and recorded properties from junit XML."""
    data = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "properties": {}}
    for path in paths:
        if not path.exists():
            continue
        for case in ET.parse(path).getroot().iter("testcase"):
            test = f"{case.get('classname', '')}::{case.get('name', '')}"
            outcome = "passed"
            for child in case:
                if child.tag in ("failure", "error"):
                    outcome = "failed" if child.tag == "failure" else "errors"
                    data["failures"].append(f"{test}: {(child.get('message') or '').splitlines()[:1]}")
                elif child.tag == "skipped" and outcome == "passed":
                    outcome = "skipped"
            data[outcome] += 1
            props = {p.get("name"): _number(p.get("value")) for p in case.iter("property")}
            if props:
                data["properties"][test] = props
    return data


def _number(text):
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


def run_step(step: Step, ctx: Context, left_s: float) -> dict:
    rec = {"name": step.name, "letter": step.letter, "title": step.title, "timeout_s": step.timeout_s,
           "status": "skipped", "seconds": 0.0, "note": "", "data": {}}
    log = ctx.scratch / "logs" / f"{step.name}.log"
    try:
        cmds = step.commands(ctx)
    except Exception as e:  # noqa: BLE001 - a broken step definition is that step's failure only
        cmds = f"could not build its command: {type(e).__name__}: {e}"
        rec["status"] = "FAIL"
    if isinstance(cmds, str):
        rec["note"] = cmds
        log.write_text(f"{rec['status']}: {cmds}\n")
        return rec
    limit = min(step.timeout_s, left_s - FINISH_RESERVE_S)
    if limit < 3:
        rec.update(status="NO TIME", note=f"{left_s:.0f} s left of the budget")
        log.write_text(rec["note"] + "\n")
        return rec
    step_json = ctx.scratch / f"{step.name}.json"
    junit = [ctx.scratch / f"{step.name}.{i}.xml" for i in range(len(cmds))]
    if step.pytest:
        cmds = [cmd + [f"--junitxml={junit[i]}"] for i, cmd in enumerate(cmds)]
    env = {**os.environ, **ctx.env, "PYTHONUNBUFFERED": "1", "GPU_CHECK_JSON": str(step_json),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH), ctx.env.get("PYTHONPATH")]))}
    if not ctx.dry_run:
        env.pop("TRITON_INTERPRET", None)    # the compiled kernels: what ships
    if len(cmds) > 1:                        # shards share the cores rather than each taking all of them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // len(cmds)))
    parts = [ctx.scratch / "logs" / f"{step.name}.{i}.part" for i in range(len(cmds))]
    print(f"\n======== ({step.letter}) {step.name}: {step.title} (timeout {limit:.0f} s) ========", flush=True)
    t0 = time.monotonic()
    codes, timed_out = run_commands(cmds, limit, env, parts)
    rec["seconds"] = round(time.monotonic() - t0, 1)
    with open(log, "w", encoding="utf-8") as f:
        for part in parts:
            f.write(part.read_text(encoding="utf-8", errors="replace"))
            part.unlink()
    if step.pytest:
        rec["data"] = junit_data(junit)
    elif step_json.exists():
        try:
            rec["data"] = json.loads(step_json.read_text())
        except ValueError as e:
            rec["data"] = {"unreadable": str(e)}
    data = rec["data"]
    bad = [c for c in codes if c not in (0, None)]
    if timed_out:
        rec["status"] = "TIMEOUT"
    elif data.get("skipped_reason"):
        rec["status"] = "skipped"
    elif step.pytest and not data["passed"]:
        rec["status"] = "FAIL"                  # all skipped or nothing collected: nothing was checked
    else:
        rec["status"] = "FAIL" if bad else "ok"
    rec["returncodes"] = codes
    rec["note"] = _note(step, rec)
    return rec


def _note(step: Step, rec: dict) -> str:
    data = rec["data"]
    if step.pytest:
        note = f"{data['passed']} passed, {data['failed']} failed, {data['errors']} errors, {data['skipped']} skipped"
        if data["failures"]:
            note += f"; first: {data['failures'][0][:90]}"
        return note
    return str(data.get("skipped_reason") or data.get("summary") or data.get("error") or "")[:160]


# -- output ---------------------------------------------------------------------------------------

def _atomic_write(path: Path, payload: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def summary_text(results: dict) -> str:
    meta = results["meta"]
    lines = [f"GPU check {meta['started']} ({'DRY RUN on the CPU, tiny sizes' if meta['dry_run'] else 'GPU'}), "
             f"{meta['elapsed_s']:.0f} s of the {meta['budget_s']} s budget; {meta.get('gpu') or ''}",
             f"{'step':<22} {'status':<8} {'s':>6} {'cap':>5}  note"]
    for r in results["steps"]:
        lines.append(f"({r['letter']}) {r['name']:<18} {r['status']:<8} {r['seconds']:>6.1f} {r['timeout_s']:>5}  "
                     f"{r['note']}")
        for test, props in r["data"].get("properties", {}).items():   # what each GPU test measured
            shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in props.items())
            lines.append(f"      {test.split('::')[-1]}: {shown}"[:220])
    lines.append("")
    lines += gpu_targets.lines(results)
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, results: dict, scratch: Path) -> None:
    """The three files, each replaced atomically: a run killed at any moment leaves readable ones."""
    _atomic_write(out / "results.json", json.dumps(results, indent=1, default=str).encode())
    _atomic_write(out / "summary.txt", summary_text(results).encode())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for log in sorted((scratch / "logs").glob("*.log")):
            tar.add(log, arcname=f"logs/{log.name}")
    _atomic_write(out / "logs.tgz", buf.getvalue())


def run(steps: List[Step], out: Path, dry_run: bool, budget_s: float, python: str, scale: float = 1.0) -> dict:
    """Run ``steps`` in order within ``budget_s`` (each timeout, and the budget, times ``scale``)."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    if scale != 1.0:
        steps = [replace(s, timeout_s=round(s.timeout_s * scale)) for s in steps]
        budget_s *= scale
    results = {"meta": {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "dry_run": dry_run,
                        "budget_s": budget_s, "timeout_scale": scale, "elapsed_s": 0.0, "python": python,
                        "timeouts_sum_s": sum(s.timeout_s for s in steps)},
               "steps": []}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        ctx = Context(python=python, dry_run=dry_run, scratch=Path(tmp))
        (ctx.scratch / "logs").mkdir()
        print(f"gpu_check: {len(steps)} steps, budget {budget_s:.0f} s, results in {out}"
              f"{' (DRY RUN)' if dry_run else ''}", flush=True)
        write_outputs(out, results, ctx.scratch)
        for step in steps:
            rec = run_step(step, ctx, budget_s - (time.monotonic() - t0))
            ctx.env.update(rec["data"].get("env") or {})   # e.g. the install's fallback PYTHONPATH
            if step.name == "env":
                results["meta"]["gpu"] = rec["data"].get("gpu")
            results["steps"].append(rec)
            results["meta"]["elapsed_s"] = round(time.monotonic() - t0, 1)
            print(f"-------- {step.name}: {rec['status']} in {rec['seconds']} s. {rec['note']}", flush=True)
            write_outputs(out, results, ctx.scratch)
    print("\n" + summary_text(results), end="", flush=True)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", default=os.environ.get("GPU_CHECK_DRY_RUN") == "1",
                   help="run on the CPU with tiny sizes, GPU-only steps skipped (also GPU_CHECK_DRY_RUN=1)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or BENCH / "results" / "gpu_check"))
    p.add_argument("--budget", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET_S", BUDGET_S)))
    p.add_argument("--only", default="", help="comma-separated step names to run (default: all)")
    p.add_argument("--timeout-scale", type=float, default=None,
                   help="multiply every timeout and the budget (default 1; 3 in a dry run: a shared CPU is slow)")
    args = p.parse_args(argv)
    steps = [s for s in STEPS if not args.only or s.name in args.only.split(",")]
    scale = args.timeout_scale if args.timeout_scale is not None else (3.0 if args.dry_run else 1.0)
    results = run(steps, args.out, args.dry_run, args.budget, os.environ.get("PYTHON") or sys.executable, scale)
    failed = [r for r in results["steps"] if r["status"] not in ("ok", "skipped")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
