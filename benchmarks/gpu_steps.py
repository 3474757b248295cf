"""Step bodies of the GPU check (``gpu_check.py`` runs each in its own process, under its own timeout).

    python benchmarks/gpu_steps.py STEP [--dry-run]      # STEP: env, install, bench, long_run, plan_vs_measured, pascal_budget

Each body writes its numbers to ``$GPU_CHECK_JSON`` (atomically, and again after every measurement, so a
step killed by its timeout keeps what it measured) and exits non-zero when its check fails. With
``--dry-run`` the same code runs on the CPU with tiny sizes; what needs a GPU is recorded as skipped.

Also here, for the tests on a GPU: ``VramProbe`` (peak device memory three ways) and ``attention_used``
(which attention backend an Engine's layers ran).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
BACKEND_NAMES = ("sdpa", "matmul", "triton", "cpp")
MIB = 2**20


class Recorder:
    """The step's JSON, rewritten atomically on every ``set``."""

    def __init__(self):
        self.path = Path(os.environ["GPU_CHECK_JSON"]) if os.environ.get("GPU_CHECK_JSON") else None
        self.data: dict = {}

    def set(self, **values) -> None:
        self.data.update(values)
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


# -- shared with the GPU tests -----------------------------------------------------------------

class VramProbe:
    """Peak device memory inside a ``with`` block, three ways (bytes above the level at entry):

    - ``allocated``: the caching allocator's peak (``max_memory_allocated``); blind to a CUDA graph's
      pool during replay, which allocates nothing;
    - ``reserved``: the allocator's reserved peak (``max_memory_reserved``), graph pools included;
    - ``device``: device-wide use from ``mem_get_info``, sampled on a thread: everything (context,
      cuBLAS workspaces, other allocators), and other processes on the GPU too.
    ``absolute`` holds the same peaks as totals (``device``: total memory minus free).
    """

    def __init__(self, device, interval_s: float = 0.002):
        import torch
        self.torch, self.device, self.interval_s = torch, torch.device(device), interval_s

    def _used(self) -> int:
        free, total = self.torch.cuda.mem_get_info(self.device)
        return total - free

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._max_used = max(self._max_used, self._used())

    def __enter__(self):
        cuda = self.torch.cuda
        cuda.synchronize(self.device)
        cuda.reset_peak_memory_stats(self.device)
        self._base = (cuda.memory_allocated(self.device), cuda.memory_reserved(self.device), self._used())
        self._max_used = self._base[2]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        cuda = self.torch.cuda
        cuda.synchronize(self.device)
        self._stop.set()
        self._thread.join()
        self._max_used = max(self._max_used, self._used())
        self.absolute = {"allocated": cuda.max_memory_allocated(self.device),
                         "reserved": cuda.max_memory_reserved(self.device), "device": self._max_used}
        self.peak = {k: v - b for (k, v), b in zip(self.absolute.items(), self._base)}
        return False


def attention_used(engine) -> dict:
    """Which backend the Engine's attention ran, per layer and variant, after a run.

    Reads the plan's own report (``plan.attention_report``: per layer, {'unmasked'/'masked': backend})
    as {"layer 1, full": name, "layer 1, padded": name, ...}; a plan without it gives {}.
    """
    report = getattr(engine.plan, "attention_report", None) or []
    return {f"layer {i + 1}, {'padded' if variant == 'masked' else 'full'}": name
            for i, layer in enumerate(report) for variant, name in sorted(layer.items())}


def backends_in(used: dict) -> set:
    """The backend names that appear in an ``attention_used`` report."""
    text = json.dumps(used)
    return {name for name in BACKEND_NAMES if re.search(rf"\b{name}\b", text)}


# -- (a) environment and install ----------------------------------------------------------------

def step_env(args, rec: Recorder) -> int:
    import torch
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "triton_interpret": os.environ.get("TRITON_INTERPRET"), "cpus": os.cpu_count()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError as e:
        info["triton"] = f"not importable: {e}"
    nvcc = shutil.which("nvcc")
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=20).stdout
        info["nvcc"] = out.strip().splitlines()[-1] if out.strip() else nvcc
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1))
    rec.set(**info, summary=f"{info.get('gpu', 'no GPU')}, torch {info['torch']}, triton {info['triton']}, "
                            f"nvcc {'yes' if nvcc else 'no'}, tf32 matmul {info['tf32_matmul']}")
    print(json.dumps(info, indent=1))
    if args.dry_run:
        return 0
    return 0 if torch.cuda.is_available() else 1


def shadow_tree(root: Path) -> Path:
    """The package as setup.py lays it out (kernels/ as rmt_fast/kernels), from symlinks under ``root``."""
    pkg = root / "rmt_fast"
    if pkg.exists():
        shutil.rmtree(root)
    pkg.mkdir(parents=True)
    for entry in (REPO / "rmt_fast").iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    (pkg / "kernels").symlink_to(REPO / "kernels")
    return root


def fallback_env(root: Path) -> dict:
    # PYTHONSAFEPATH: `python -m pytest` and `python -c` would put the working directory (the repository)
    # first on sys.path, and its rmt_fast/ (no kernels/ inside) would shadow the tree on PYTHONPATH.
    return {"PYTHONPATH": str(root), "PYTHONSAFEPATH": "1"}


_PROBE = ("import json, rmt_fast, rmt_fast.kernels.attention as a; from rmt_fast import _ext\n"
          "print('PROBE', json.dumps({'rmt_fast': rmt_fast.__file__, 'kernels': a.__file__,"
          " 'ext': _ext.available(), 'ext_cuda': _ext.built_with_cuda(), 'why_not_cuda': _ext.why_unavailable('cuda')}))")


def probe_import(env: dict) -> dict:
    """Where ``import rmt_fast`` resolves from the repository root, and the extension's state."""
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)
    for line in proc.stdout.splitlines():
        if line.startswith("PROBE "):
            return json.loads(line[6:])
    return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}


def run_streamed(cmd: list, env: dict, timeout_s: float) -> tuple:
    """(return code or "timeout", output lines); the output is echoed as it comes, and on a timeout the
    whole process group goes (pip's compilers: ninja, nvcc), not just ``cmd``."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines: list = []

    def echo():
        for line in proc.stdout:
            lines.append(line)
            print(line, end="", flush=True)
    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = "timeout"
    reader.join(5)
    return rc, lines


def _pip_install(extra_env: dict, timeout_s: float) -> tuple:
    """(return code or "timeout", seconds, error lines)."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", str(REPO)]
    print("$", " ".join(f"{k}={v}" for k, v in extra_env.items()), " ".join(cmd), flush=True)
    t0 = time.monotonic()
    rc, lines = run_streamed(cmd, {**os.environ, **extra_env}, timeout_s)
    errors = [ln.strip() for ln in lines if re.search(r"\berror\b|Error:|RuntimeError", ln)]
    if rc == "timeout":
        errors.append(f"the build took more than {timeout_s:.0f} s")
    return rc, round(time.monotonic() - t0, 1), errors[:8]


def step_install(args, rec: Recorder) -> int:
    """The CUDA build; else the pure-torch install; else the symlinked tree. Says which, and why."""
    scratch = Path(os.environ.get("GPU_CHECK_JSON", REPO / "build" / "x")).parent
    if args.dry_run:
        env = fallback_env(shadow_tree(scratch / "shadow"))
        found = probe_import(env)
        ok = str(found.get("rmt_fast", "")).startswith(str(scratch / "shadow"))
        rec.set(mode="symlinked tree (dry run: pip is not run)", env=env, probe=found,
                summary=f"dry run: fallback tree {'imports' if ok else 'does NOT import'} rmt_fast.kernels")
        return 0 if ok else 1
    cuda_env = {"RMT_FAST_FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": args.arch,
                "MAX_JOBS": str(os.cpu_count() or 4)}
    rc, secs, errors = _pip_install(cuda_env, args.build_timeout)
    rec.set(cuda_build={"rc": rc, "seconds": secs, "errors": errors})
    mode, env = "editable, with the CUDA extension", {}
    if rc != 0:
        rc2, secs2, errors2 = _pip_install({"RMT_FAST_SKIP_EXT": "1"}, 20)
        rec.set(pure_build={"rc": rc2, "seconds": secs2, "errors": errors2})
        mode = "editable, pure torch (RMT_FAST_SKIP_EXT=1)"
        if rc2 != 0:
            env = fallback_env(shadow_tree(scratch / "shadow"))
            mode = "symlinked tree on PYTHONPATH (both pip installs failed)"
    found = probe_import(env)
    ok = bool(found.get("ext_cuda"))
    why = None if ok else (errors[:2] if rc != 0 else found.get("why_not_cuda") or found.get("error"))
    rec.set(mode=mode, env=env, probe=found, why_no_cuda_extension=why,
            summary=f"{mode}; CUDA extension {'built' if ok else f'NOT built: {why}'}")
    return 0 if ok else 1


# -- (f) benchmarks -------------------------------------------------------------------------------

def _sizes(args) -> dict:
    if args.dry_run:
        return dict(device="cpu", layers=2, batches=[1], ref_segments=1, engine_segments=2, long_segments=4)
    return dict(device="cuda", layers=12, batches=[1, 8, 32], ref_segments=2, engine_segments=12,
                long_segments=4096)


def _model(args, layers: int):
    """bert-base-cased's shape with ``layers`` layers, random weights; a tiny one (head_dim 64) in a dry run."""
    if not args.dry_run:
        from rmt_fast.bench import builtin_model
        return builtin_model(layers)
    from transformers import BertConfig

    from rmt_fast import RMTConfig, RMTForSequenceClassification
    bc = BertConfig(vocab_size=2000, hidden_size=64, num_hidden_layers=layers, num_attention_heads=1,
                    intermediate_size=128, max_position_embeddings=64)
    return RMTForSequenceClassification.from_configs(
        RMTConfig(vocab_size=2000, num_mem_tokens=4, input_size=64, num_labels=6), bc).eval()


def step_bench(args, rec: Recorder) -> int:
    """ms per segment, bf16, bert-base shape: the reference's way, the tuned baseline, Engine eager and graphed."""
    import torch
    sys.path.insert(0, str(BENCH))
    from bench_segments import gemm_rate, reference_loop, segment_flops, timed

    from rmt_fast import Engine

    z = _sizes(args)
    dev, cuda = z["device"], z["device"] == "cuda"
    torch.manual_seed(0)
    model = _model(args, z["layers"])
    cfg = model.config
    rows, gemm = [], {}
    rec.set(layers=z["layers"], device=dev, rows=rows, gemm_tflops=gemm)
    for B in z["batches"]:
        rate = gemm_rate(device=dev, rows=512 * B)
        gemm[B] = rate / 1e12
        floor_ms = 1000 * segment_flops(z["layers"]) / rate
        docs = {n: [torch.randint(1000, cfg.vocab_size, (n * cfg.segment_size,)) for _ in range(B)]
                for n in (z["ref_segments"], z["engine_segments"])}
        cases = {"reference": (z["ref_segments"], lambda d: reference_loop(model, d, torch.float32, True, "eager", dev)),
                 "baseline": (z["ref_segments"], lambda d: reference_loop(model, d, torch.bfloat16, False, "sdpa", dev))}
        engines = {"engine_eager": Engine(model, dev, torch.bfloat16, cuda_graphs=False)}
        if cuda:
            engines["engine_graphs"] = Engine(model, dev, torch.bfloat16, cuda_graphs=True)
        for name, e in engines.items():
            cases[name] = (z["engine_segments"], lambda d, e=e: (lambda: e.classify(d, batch_size=B)))
        for name, (n, make) in cases.items():
            run = make(docs[n])                 # one model copy per case; the warm-up is the same run
            with torch.inference_mode():
                r = timed({"warm": run, "run": run}, B, n, dev)
            row = {"case": name, "batch": B, "segments": n, "floor_ms": floor_ms, **r}
            if name in engines:
                row.update(attention=attention_used(engines[name]), graphs=engines[name].graphs_status)
            rows.append(row)
            rec.set(rows=rows, gemm_tflops=gemm)
            print(f"B={B:>2} {name:<14} {r['ms_per_segment']:9.3f} ms/segment  peak {r['peak_mib']:8.1f} MiB"
                  f"  {row.get('attention', '')}", flush=True)
    best = {r["batch"]: r["ms_per_segment"] for r in rows if r["case"].startswith("engine")}
    rec.set(summary="engine ms/segment " + ", ".join(f"B={b}: {ms:.3f}" for b, ms in best.items()))
    return 0


def step_long_run(args, rec: Recorder) -> int:
    """One document of 4,096 full segments at B=1, bf16, graphs (eager on the CPU): time and peak memory."""
    import torch

    from rmt_fast import Engine

    z = _sizes(args)
    dev, cuda = z["device"], z["device"] == "cuda"
    torch.manual_seed(0)
    model = _model(args, z["layers"])
    S, n = model.config.segment_size, z["long_segments"]
    engine = Engine(model, dev, torch.bfloat16)
    doc = torch.randint(1000, model.config.vocab_size, (n * S,))
    engine.classify([doc[:2 * S]], batch_size=1)                       # warm-up: compile, capture
    probe = VramProbe(dev) if cuda else None
    t0 = time.perf_counter()
    if probe:
        with probe:
            engine.classify([doc], batch_size=1)
    else:
        engine.classify([doc], batch_size=1)
    secs = time.perf_counter() - t0
    result = {"segments": n, "tokens": n * S, "seconds": secs, "ms_per_segment": 1000 * secs / n,
              "graphs": engine.graphs_status, "attention": attention_used(engine)}
    if probe:
        result.update(peak_above_start_mib={k: v / MIB for k, v in probe.peak.items()},
                      peak_absolute_mib={k: v / MIB for k, v in probe.absolute.items()})
    rec.set(**result, summary=f"{n} segments ({n * S:,} tokens) in {secs:.2f} s" +
            (f", peak allocated {probe.absolute['allocated'] / MIB:.0f} MiB" if probe else ""))
    print(json.dumps(result, indent=1, default=str))
    return 0


def step_plan_vs_measured(args, rec: Recorder) -> int:
    """Issue 21's ``rmt-fast plan`` predictions next to this run's measurements, where that command exists."""
    plan = [sys.executable, "-m", "rmt_fast", "plan"]
    if subprocess.run(plan + ["--help"], capture_output=True, timeout=60).returncode != 0:
        rec.set(skipped_reason="`rmt-fast plan` is not available yet (issue 21)")
        return 0
    scratch = Path(os.environ.get("GPU_CHECK_JSON", REPO / "x")).parent
    measured = []
    if (scratch / "bench.json").exists():
        measured = [r for r in json.loads((scratch / "bench.json").read_text()).get("rows", [])
                    if r["case"].startswith("engine")]
    device = "cpu" if args.dry_run else "cuda"
    rows = []
    for batch in sorted({r["batch"] for r in measured}):     # one prediction per batch size
        cmd = plan + ["--device", device, "--batch", str(batch), "--dtype", "bfloat16", "--json"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        try:
            pred = json.loads(proc.stdout)
        except ValueError:
            pred = {"error": (proc.stderr.strip().splitlines() or ["no JSON"])[-1]}
        rows += [{"case": r["case"], "batch": batch, "measured_ms": r["ms_per_segment"],
                  "predicted_ms": pred.get("ms_per_segment"), "predicted_peak_bytes": pred.get("peak_bytes"),
                  "error": pred.get("error")} for r in measured if r["batch"] == batch]
        rec.set(rows=rows)
    rec.set(rows=rows, summary=f"{len(rows)} rows predicted" if rows else "no measured rows to predict")
    return 0


def step_pascal_budget(args, rec: Recorder) -> int:
    """The GTX 1080 Ti's run emulated (issue 16): 11 GiB cap, float32, the attention an sm_61 GPU gets.

    (1) One document of 4,096 segments at B=1: time and peak by all three measures, next to
    perfmodel.estimate's (the report's "3.6 GB" is the base model's figure). (2) The slot count
    ``max_memory="10GiB"`` chooses, one 2-segment document per slot: the measured peak must fit the budget.
    """
    import torch

    from rmt_fast import Engine
    from rmt_fast.engine import backends
    from rmt_fast.perfmodel import estimate

    z = _sizes(args)
    dev, cuda = z["device"], z["device"] == "cuda"
    budget = 10 * 2**30 if cuda else 64 * MIB
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, 11 * 2**30 / total), 0)
    torch.manual_seed(0)
    model = _model(args, z["layers"])
    cfg, bconf = model.config, model.model.config
    head_dim = bconf.hidden_size // bconf.num_attention_heads
    attention, _ = backends.cuda_choice(torch.float32, (6, 1), head_dim, arch_list=["sm_60"])
    engine = Engine(model, dev, torch.float32, attention=attention)
    S, n = cfg.segment_size, z["long_segments"]
    doc = torch.randint(1000, cfg.vocab_size, (n * S,))
    engine.classify([doc[:2 * S]], batch_size=1)                       # warm-up: capture
    dims = estimate.dims_of(cfg, bconf)
    est1 = estimate.peak_bytes(dims, 1, "float32", cuda, engine.cuda_graphs)
    result = {"attention_sm61": attention, "estimate_b1_mib": est1 / MIB, "segments": n}
    probe = VramProbe(dev) if cuda else None
    t0 = time.perf_counter()
    with (probe or _Nothing()):
        engine.classify([doc], batch_size=1)
    result.update(seconds=time.perf_counter() - t0, used=attention_used(engine))
    if probe:
        result.update(b1_peak_absolute_mib={k: v / MIB for k, v in probe.absolute.items()})
    rec.set(**result)
    del engine                                  # the budget's Engine alone on the device
    if cuda:
        torch.cuda.empty_cache()
    engine = Engine(model, dev, torch.float32, attention=attention, max_memory=budget)
    slots = engine.max_slots
    parts = estimate.memory_parts(dims, slots, "float32", cuda, engine.cuda_graphs)
    result.update(chosen_slots=slots, estimate_mib=sum(parts.values()) / MIB,
                  estimate={k: v / MIB for k, v in parts.items()})
    rec.set(**result)
    docs = [torch.randint(1000, cfg.vocab_size, (2 * S,)) for _ in range(slots)]
    engine.classify(docs)                                              # warm-up: capture at this width
    probe = VramProbe(dev) if cuda else None
    with (probe or _Nothing()):
        engine.classify(docs)
    if probe:
        result.update(slots_peak_absolute_mib={k: v / MIB for k, v in probe.absolute.items()},
                      fits=probe.absolute["reserved"] <= budget)
    rec.set(**result, summary=f"B=1 fp32 {n} segments in {result['seconds']:.1f} s; max_memory chose "
            f"{slots} slots (estimate {result['estimate_mib']:.0f} MiB)")
    print(json.dumps(result, indent=1, default=str))
    return 0 if result.get("fits", True) else 1


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


STEPS = {"env": step_env, "install": step_install, "bench": step_bench, "long_run": step_long_run,
         "plan_vs_measured": step_plan_vs_measured, "pascal_budget": step_pascal_budget}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=sorted(STEPS))
    p.add_argument("--dry-run", action="store_true", help="on the CPU, tiny sizes")
    p.add_argument("--arch", default="9.0", help="TORCH_CUDA_ARCH_LIST for the install (the H200: 9.0)")
    p.add_argument("--build-timeout", type=float, default=75, help="seconds for the CUDA build before falling back")
    args = p.parse_args(argv)
    rec = Recorder()
    try:
        return STEPS[args.step](args, rec)
    except Exception as e:
        rec.set(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        raise


if __name__ == "__main__":
    sys.exit(main())
