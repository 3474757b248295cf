"""The Triton attention kernel compiled for every GPU target with no GPU (benchmarks/kernel_report.py --ci),
and the target-aware default config and autotune prune (rmt_fast.kernels.attention)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rmt_fast.kernels import attention as A

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
TARGETS = (61, 75, 80, 86, 89, 90)
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def _dtypes(cc):
    return (torch.float32, torch.float16) if cc < 80 else (torch.float32, torch.float16, torch.bfloat16)


@pytest.mark.skipif(not PTXAS.exists(), reason="this triton ships no ptxas")
def test_default_configs_compile_for_every_target(tmp_path):
    """Compile (no GPU) the default config of each dtype and head_dim for each target, key lengths on.

    Fails on a compile error, a spill in float16/bfloat16 on sm_80+, or shared memory over the target's
    per-block limit (the script's --ci exit status), and checks the rows it wrote.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")      # a real compile, not a cache hit
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_report.py"), "--ci", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.loads(out.read_text())["triton"]
    want = {(cc, dt, d) for cc in TARGETS for dt in (("fp32", "fp16") if cc < 80 else ("fp32", "fp16", "bf16"))
            for d in (32, 64, 128)}
    assert {(r["target"], r["dtype"], r["head_dim"]) for r in rows} == want
    for r in rows:
        assert r["compiled"], r
        assert r["registers"] > 0, r
        assert r["shared"] <= r["smem_limit"], r
        assert r["shared"] <= r["smem_estimate"], f"the prune's shared-memory bound is not an upper bound: {r}"
        if r["target"] >= 80 and r["dtype"] != "fp32":
            assert r["spill_stores"] == r["spill_loads"] == 0, r
        assert r["blocks_per_sm"] >= 1, r


def test_report_rejects_bad_targets():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_report.py"), "--ci", "--targets", "70"],
                          env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "--targets" in proc.stderr


@pytest.mark.parametrize("cc", TARGETS)
def test_defaults_fit_each_target(cc):
    for dtype in _dtypes(cc):
        for d in (32, 64, 128):
            for tq in (1, 11, 100, 522, 4096):
                c = A._default_config(tq, 10 ** 4, d, None, dtype, cc)
                why = A.config_fits(c["BLOCK_M"], c["BLOCK_N"], c["num_warps"], c["num_stages"], d, dtype, cc)
                assert why is None, (cc, dtype, d, tq, c, why)
                assert c["BLOCK_M"] <= max(16, A._next_pow2(tq))


@pytest.mark.parametrize("cc", TARGETS)
def test_prune_keeps_only_what_fits_each_target(cc):
    configs = [A._config_tuple(c) for c in A._attn_fwd_tuned.configs]
    for dtype in _dtypes(cc):
        for d in (32, 64, 128):
            for tq, tk in ((522, 522), (11, 522), (1, 4096), (512, 512)):
                kept = A.prune_for_target(configs, tq, tk, d, dtype, cc)
                assert 1 <= len(kept) <= 8, (cc, dtype, d, tq)
                for bm, bn, w, s in kept:
                    assert A.config_fits(bm, bn, w, s, d, dtype, cc) is None, (cc, dtype, d, (bm, bn, w, s))


def test_shared_memory_limit_differs_by_target():
    # 32x128 tiles at head_dim 128 in 3 stages need ~208 KiB: Hopper has it, A100 (163) and sm_86/89 (99) do not.
    configs = [A._config_tuple(c) for c in A._attn_fwd_tuned.configs]
    big = (32, 128, 4, 3)
    assert big in A.prune_for_target(configs, 20, 522, 128, torch.bfloat16, 90)
    assert big not in A.prune_for_target(configs, 20, 522, 128, torch.bfloat16, 80)
    assert big not in A.prune_for_target(configs, 20, 522, 128, torch.bfloat16, 86)
    assert "shared memory" in A.config_fits(*big, 128, torch.bfloat16, 89)
    assert A.config_fits(128, 64, 4, 3, 64, torch.float16, 80).endswith("(it would spill)")
    assert A.config_fits(128, 64, 8, 3, 64, torch.float16, 80) is None
    # Inside the register estimate but seen spilling by the report on sm_86: pruned there, not on sm_90.
    assert "kernel report" in A.config_fits(16, 64, 4, 2, 128, torch.bfloat16, 86)
    assert A.config_fits(16, 64, 4, 2, 128, torch.bfloat16, 90) is None
    assert A._default_config(11, 10 ** 4, 128, None, torch.bfloat16, 86)["num_warps"] == 8


def test_prune_under_the_autotuner_reads_the_launch_target(monkeypatch):
    # The autotuner's hook: with a (faked) sm_86 GPU behind Q, the sm_86 limits apply.
    class FakeQ:
        is_cuda, dtype, device = True, torch.bfloat16, torch.device("cuda", 0)

    monkeypatch.setattr(A, "_INTERPRETED", False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    kept = A._prune_configs(A._attn_fwd_tuned.configs, {"Q": FakeQ(), "Tq": 11, "Tk": 522}, HEAD_DIM=128)
    assert kept and all(A.config_fits(*A._config_tuple(c), 128, torch.bfloat16, 86) is None for c in kept)
    kept = A._prune_configs(A._attn_fwd_tuned.configs, {"Q": FakeQ(), "Tq": 20, "Tk": 522}, HEAD_DIM=128)
    assert kept and (32, 128, 4, 3) not in [A._config_tuple(c) for c in kept]
