"""The GPU check's plumbing, on the CPU: the dry run end to end, and the runner with planted failures.

The check is only worth its GPU loan if it finishes inside the budget with every result returned, so
these run in CI: step order and budget, at most 8 files with nothing nested, results.json and summary.txt
readable after every step, a failing or hanging step recorded while the later ones still run, pytest
shards counted from their junit XML, and the install's fallback tree importable from the repository root.
"""
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402
import gpu_steps  # noqa: E402
import gpu_targets  # noqa: E402
from gpu_check import Step  # noqa: E402

MAX_FILES = 8          # what the device tool returns


def _steps_in_order():
    return [s.name for s in gpu_check.STEPS]


def test_steps_in_priority_order_and_timeouts_inside_the_budget():
    letters = [s.letter for s in gpu_check.STEPS]
    assert letters == sorted(letters) and set(letters) == set("abcdef"), letters
    assert _steps_in_order()[:2] == ["env", "install"]
    assert len(set(_steps_in_order())) == len(gpu_check.STEPS)
    total = sum(s.timeout_s for s in gpu_check.STEPS)
    assert total + gpu_check.FINISH_RESERVE_S <= gpu_check.BUDGET_S <= 7 * 60, (total, gpu_check.BUDGET_S)


def test_dry_run_end_to_end(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(gpu_check.OUT_FILES) and len(files) <= MAX_FILES, files
    assert all(p.is_file() for p in out.iterdir()), "only plain files come back"

    results = json.loads((out / "results.json").read_text())
    steps = results["steps"]
    assert [s["name"] for s in steps] == _steps_in_order()
    assert results["meta"]["dry_run"] and results["meta"]["timeouts_sum_s"] < results["meta"]["budget_s"]
    by = {s["name"]: s for s in steps}
    for name in ("env", "install", "bench", "long_run", "pascal_budget"):   # what runs on a CPU does run
        assert by[name]["status"] == "ok", by[name]
    for name in ("ext_ops", "triton", "engine", "driver", "vram", "attention_bench"):
        assert by[name]["status"] == "skipped" and "GPU" in by[name]["note"], by[name]
    pascal = by["pascal_budget"]["data"]              # the 1080 Ti emulation's arithmetic ran end to end
    assert pascal["chosen_slots"] >= 1 and pascal["estimate_mib"] <= 64 and pascal["segments"] == 4, pascal
    bench = by["bench"]["data"]["rows"]
    assert {r["case"] for r in bench} == {"reference", "baseline", "engine_eager"}
    assert all(r["ms_per_segment"] > 0 for r in bench)
    assert gpu_steps.backends_in(bench[-1]["attention"]), bench[-1]
    assert by["install"]["data"]["env"]["PYTHONSAFEPATH"] == "1"

    summary = (out / "summary.txt").read_text()
    assert proc.stdout.rstrip().endswith(summary.rstrip()), "the summary is printed last"
    for name in _steps_in_order():
        assert name in summary
    with tarfile.open(out / "logs.tgz") as tar:
        logs = sorted(m.name for m in tar.getmembers())
    assert logs == sorted(f"logs/{n}.log" for n in _steps_in_order())


def _python_step(name, code, timeout_s=20, letter="a"):
    return Step(name, letter, name, timeout_s, lambda ctx: [[sys.executable, "-c", textwrap.dedent(code)]])


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped (by whatever adopted it)."""
    time.sleep(0.5)
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_failures_and_timeouts_are_recorded_and_later_steps_run(tmp_path, monkeypatch):
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)     # the driver must set it for its steps
    out = tmp_path / "out"
    steps = [
        _python_step("fails", "print('partial output'); raise SystemExit(3)"),
        # A hang: a child process that outlives its parent unless the whole group is killed.
        _python_step("hangs", f"""
            import subprocess, sys, time
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
            open({str(tmp_path / 'child.pid')!r}, 'w').write(str(child.pid))
            print('before the hang'); time.sleep(120)""", timeout_s=3),
        # Runs after both, and sees their records already written.
        _python_step("reads_results", f"""
            import json, os
            steps = json.load(open({str(out / 'results.json')!r}))["steps"]
            assert [s['status'] for s in steps] == ['FAIL', 'TIMEOUT'], steps
            json.dump({{'summary': 'saw both'}}, open(os.environ['GPU_CHECK_JSON'], 'w'))"""),
        Step("no_command", "b", "x", 5, lambda ctx: "needs a GPU"),
        Step("broken", "b", "x", 5, lambda ctx: 1 / 0),
    ]
    t0 = time.monotonic()
    results = gpu_check.run(steps, out, dry_run=True, budget_s=60, python=sys.executable)
    assert time.monotonic() - t0 < 30, "the hanging step was not cut at its timeout"
    status = {s["name"]: s for s in results["steps"]}
    assert status["fails"]["status"] == "FAIL" and status["fails"]["returncodes"] == [3]
    assert status["hangs"]["status"] == "TIMEOUT"
    child = int((tmp_path / "child.pid").read_text())
    assert not _running(child), "the step's child outlived it: kill the process group, not just the step"
    assert status["reads_results"]["status"] == "ok" and status["reads_results"]["note"] == "saw both"
    assert status["no_command"]["status"] == "skipped" and status["no_command"]["note"] == "needs a GPU"
    assert status["broken"]["status"] == "FAIL" and "ZeroDivisionError" in status["broken"]["note"]
    with tarfile.open(out / "logs.tgz") as tar:
        hang_log = tar.extractfile("logs/hangs.log").read().decode()
        fail_log = tar.extractfile("logs/fails.log").read().decode()
    # (the log's first line is the command, which holds these words too: look for output lines)
    assert "before the hang" in hang_log.splitlines(), "output of a killed step was buffered and lost"
    assert "partial output" in fail_log.splitlines()
    assert json.loads((out / "results.json").read_text())["steps"][-1]["name"] == "broken"


def test_budget_caps_each_step(tmp_path):
    steps = [_python_step("sleeps", "import time; time.sleep(30)", timeout_s=30),
             _python_step("too_late", "print('ran')", timeout_s=30)]
    results = gpu_check.run(steps, tmp_path / "out", dry_run=True, budget_s=gpu_check.FINISH_RESERVE_S + 4,
                            python=sys.executable)
    first, second = results["steps"]
    assert first["status"] == "TIMEOUT" and first["seconds"] < 10
    assert second["status"] == "NO TIME"


def test_pytest_shards_are_counted_from_junit(tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_sample.py").write_text(textwrap.dedent("""
        import pytest
        @pytest.mark.parametrize("i", range(4))
        def test_ok(i, record_property):
            record_property("value", i * 0.5)
        def test_fails():
            assert 1 == 2, "planted"
        def test_skips():
            pytest.skip("no GPU")
    """))
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "pytest_shard",
            "-c", str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path), str(tmp_path / "test_sample.py")]
    step = Step("shards", "c", "x", 60, lambda ctx: [base + [f"--shard={i}/3"] for i in range(3)], pytest=True)
    all_skipped = Step("all_skipped", "c", "x", 60, lambda ctx: [base + ["-k", "skips"]], pytest=True)
    results = gpu_check.run([step, all_skipped], tmp_path / "out", dry_run=True, budget_s=90,
                            python=sys.executable)
    rec, skipped = results["steps"]
    assert skipped["status"] == "FAIL" and skipped["note"].startswith("0 passed"), skipped  # nothing checked
    data = rec["data"]
    assert (data["passed"], data["failed"], data["skipped"]) == (4, 1, 1), data
    assert rec["status"] == "FAIL" and "test_fails" in rec["note"]
    values = sorted(p["value"] for p in data["properties"].values())
    assert values == [0, 0.5, 1.0, 1.5]


def test_fallback_tree_imports_from_the_repository_root(tmp_path):
    """Item 9: the repository's own rmt_fast/ (no kernels/ inside) must not shadow the symlinked tree."""
    root = gpu_steps.shadow_tree(tmp_path / "shadow")
    found = gpu_steps.probe_import(gpu_steps.fallback_env(root))
    assert found.get("rmt_fast", "").startswith(str(root)), found
    assert Path(found["kernels"]).resolve() == (ROOT / "kernels" / "attention.py").resolve(), found


def _results(rows=(), attention=(), vram=None, long_run=None, pascal=None):
    steps = [{"name": "bench", "data": {"rows": list(rows)}},
             {"name": "attention_bench", "data": {"rows": list(attention)}},
             {"name": "vram", "data": {"properties": vram or {}}},
             {"name": "long_run", "data": long_run or {}},
             {"name": "pascal_budget", "data": pascal or {}}]
    return {"meta": {"dry_run": False}, "steps": steps}


def test_targets_read_met_not_met_or_not_measured():
    rows = [{"case": "engine_graphs", "batch": 1, "ms_per_segment": 0.4, "floor_ms": 0.1},
            {"case": "reference", "batch": 1, "ms_per_segment": 3.0, "floor_ms": 0.1},
            {"case": "engine_graphs", "batch": 32, "ms_per_segment": 0.3, "floor_ms": 0.1}]
    text = "\n".join(gpu_targets.lines(_results(rows)))
    assert "MET     Engine with graphs, B=1: 0.400" in text
    assert "NOT MET 7.5x the reference's way" in text
    assert "NOT MET B=32: 33% of this run's bf16 GEMM rate" in text
    assert "NOT MEASURED Triton attention" in text and "NOT MEASURED flat VRAM" in text

    attention = [{"T": 512, "batch": 32, "mode": "full", "provider": "triton", "ms": 0.2},
                 {"T": 512, "batch": 32, "mode": "full", "provider": "sdpa_flash", "ms": 0.25}]
    vram = {"t::test_vram[graphs-1]": {"growth_allocated": 0, "growth_reserved": 2**21, "growth_device": 0}}
    long_run = {"segments": 4096, "seconds": 2.0,
                "peak_absolute_mib": {"allocated": 600.0, "reserved": 700.0, "device": 1500.0}}
    text = "\n".join(gpu_targets.lines(_results(rows, attention, vram, long_run)))
    assert "MET     Triton attention B=32" in text
    assert "NOT MET flat VRAM 16 -> 4096 segments: worst growth +2.000 MiB" in text
    assert "MET     peak at B=1" in text
    assert "NOT MEASURED fp32 B=1 peak" in text and "NOT MEASURED max_memory=10GiB" in text

    pascal = {"segments": 4096, "seconds": 30.0, "attention_sm61": "sdpa", "estimate_b1_mib": 960.0,
              "b1_peak_absolute_mib": {"allocated": 900.0, "reserved": 1000.0, "device": 1500.0},
              "chosen_slots": 40, "estimate_mib": 9000.0, "fits": False,
              "slots_peak_absolute_mib": {"allocated": 9000.0, "reserved": 10300.0, "device": 11000.0}}
    text = "\n".join(gpu_targets.lines(_results(rows, attention, vram, long_run, pascal)))
    assert "MEASURED fp32 B=1 peak over 4096 segments, sm_61 dispatch (sdpa): allocated 900 MiB" in text
    assert "NOT MET max_memory=10GiB chose 40 slots: reserved 10300 MiB" in text
    assert gpu_targets.lines({"meta": {"dry_run": True}, "steps": []})[0].startswith("targets: not judged")


def test_cuda_only_keeps_the_gpu_tests(tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_mixed.py").write_text(textwrap.dedent("""
        import pytest
        requires_cuda = pytest.mark.skipif(False, reason="needs a CUDA GPU")
        @requires_cuda
        def test_marked():
            pass
        def test_streams_on_cuda():
            pass
        def test_cpu_only():
            pass
        @pytest.mark.skipif(False, reason="slow")
        def test_other_skipif():
            pass
    """))
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "pytest_shard", "-rA",
            "-c", str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path), str(tmp_path / "test_mixed.py"),
            "--cuda-only"]
    proc = subprocess.run(base, capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "benchmarks")})
    assert "2 passed, 2 deselected" in proc.stdout, proc.stdout
    assert "test_marked" in proc.stdout and "test_streams_on_cuda" in proc.stdout


@pytest.mark.parametrize("spec", ["3/3", "0/0"])
def test_shard_plugin_rejects_bad_specs(tmp_path, spec):
    (tmp_path / "test_one.py").write_text("def test_one():\n    pass\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "pytest_shard",
                           "--rootdir", str(tmp_path), str(tmp_path / "test_one.py"), f"--shard={spec}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "benchmarks")})
    assert proc.returncode != 0


def test_gpu_tests_use_a_head_dim_the_triton_kernel_takes():
    """Item 3: with head_dim 8 or 16, `auto` quietly picks SDPA and Triton never runs inside the Engine."""
    import test_graphs
    from helpers import bert_base_cased_config
    from rmt_fast.kernels.attention import SUPPORTED_HEAD_DIMS

    for config in (test_graphs._gpu_model().model.config, bert_base_cased_config(num_layers=2)):
        assert config.hidden_size // config.num_attention_heads in SUPPORTED_HEAD_DIMS, config


class _FakeCudaMemory:
    """torch.cuda's memory counters for one make-believe device, driven by the test."""
    TOTAL = 100 * 2**30

    def __init__(self):
        self.allocated, self.reserved, self.used = 10 * 2**20, 20 * 2**20, 2**30
        self.max_allocated, self.max_reserved = self.allocated, self.reserved

    def install(self, monkeypatch):
        import torch
        fns = {"synchronize": lambda device=None: None, "reset_peak_memory_stats": self.reset,
               "memory_allocated": lambda device=None: self.allocated,
               "memory_reserved": lambda device=None: self.reserved,
               "max_memory_allocated": lambda device=None: self.max_allocated,
               "max_memory_reserved": lambda device=None: self.max_reserved,
               "mem_get_info": lambda device=None: (self.TOTAL - self.used, self.TOTAL)}
        for name, fn in fns.items():
            monkeypatch.setattr(torch.cuda, name, fn)

    def reset(self, device=None):
        self.max_allocated, self.max_reserved = self.allocated, self.reserved


def test_vram_probe_counts_the_graph_pool_and_device_spikes(monkeypatch):
    """A replayed graph allocates nothing (max_memory_allocated stays flat) while its pool grows the
    reserve, and a short device-wide spike is over before the block ends: the probe must see both."""
    fake = _FakeCudaMemory()
    fake.install(monkeypatch)
    with gpu_steps.VramProbe("cuda", interval_s=0.001) as probe:
        fake.reserved += 6 * 2**20                   # the graph pool's working memory
        fake.max_reserved = fake.reserved
        fake.used += 50 * 2**20                      # a spike (cuBLAS workspace, another allocator)...
        time.sleep(0.2)
        fake.used -= 50 * 2**20                      # ... gone again before the block ends
    assert probe.peak == {"allocated": 0, "reserved": 6 * 2**20, "device": 50 * 2**20}, probe.peak
    assert probe.absolute["reserved"] == 26 * 2**20 and probe.absolute["device"] == 2**30 + 50 * 2**20


def test_attention_used_reads_the_plan_report():
    """What the check records per run: the backend each layer and variant ran, from the plan's report."""
    import torch
    from helpers import tiny_model
    from rmt_fast import Engine

    engine = Engine(tiny_model(), attention="matmul")
    engine.classify([torch.randint(3, 60, (n,)) for n in (5, 40)], batch_size=2)
    used = gpu_steps.attention_used(engine)
    assert used == {f"layer {i}, {v}": "matmul" for i in (1, 2) for v in ("full", "padded")}, used
    assert gpu_steps.backends_in(used) == {"matmul"}
    assert gpu_steps.attention_used(SimpleNamespace(plan=SimpleNamespace())) == {}


def test_install_build_timeout_takes_the_compilers_with_it(tmp_path):
    """A CUDA build cut at its limit must not leave nvcc/ninja running beside the fallback install."""
    code = (f"import subprocess, sys, time\n"
            f"c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            f"open({str(tmp_path / 'pid')!r}, 'w').write(str(c.pid))\n"
            f"print('compiling', flush=True); time.sleep(120)\n")
    t0 = time.monotonic()
    rc, lines = gpu_steps.run_streamed([sys.executable, "-c", code], dict(os.environ), timeout_s=3)
    assert rc == "timeout" and time.monotonic() - t0 < 20
    assert "compiling\n" in lines
    assert not _running(int((tmp_path / "pid").read_text()))
