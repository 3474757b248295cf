"""The shared references themselves: the oracle's differentiable variant, the benchmark baseline against
the oracle, and the seeds that make every random draw reproducible."""
import os
import subprocess
import sys
from pathlib import Path

import torch

from conftest import seed_for
from helpers import oracle, random_docs, tiny_model
from oracle import oracle_logits

ROOT = Path(__file__).resolve().parents[1]


def test_the_differentiable_oracle_is_the_oracle():
    model = tiny_model()
    cfg = model.config
    doc = random_docs([60], cfg.vocab_size, low=3)[0]
    logits, memory = oracle_logits(model.model, doc, vocab_size=cfg.vocab_size, num_mem_tokens=cfg.num_mem_tokens,
                                   input_size=cfg.input_size, cls_id=1, sep_id=2, pad_id=0, bptt_depth=1,
                                   return_memory=True)
    assert logits.requires_grad and memory.shape == (cfg.num_mem_tokens, model.model.config.hidden_size)
    assert torch.equal(logits.detach().double(), oracle(model, doc))


def test_the_benchmark_baseline_gives_the_oracles_logits():
    """rmt_fast.baselines' reference loop (the timing baseline of rmt-fast bench and
    benchmarks/bench_segments.py) computes what the oracle does."""
    from rmt_fast.baselines import reference_loop
    model = tiny_model()
    S = model.config.segment_size
    docs = random_docs([3 * S, 3 * S], model.config.vocab_size, low=3)
    with torch.no_grad():
        got = reference_loop(model, docs, torch.float32, keep_outputs=False, attn="eager")()
    want = torch.stack([oracle(model, d) for d in docs])
    assert (got.double() - want).abs().max() <= 1e-5


def test_a_failing_test_prints_its_seed_and_replays_its_draws(tmp_path):
    """conftest seeds torch, numpy and ``random`` from the test id and prints the seed on failure."""
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "test_draw.py").write_text(
        "import random\nimport torch\n\n"
        "def test_draw():\n"
        "    print('DRAW', random.randint(0, 10**9), int(torch.randint(0, 10**9, ())))\n"
        "    assert False\n")
    env = {**os.environ, "RMT_FAST_TEST_SEED": "0"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--keep-duplicates",
                        "test_draw.py", "test_draw.py"],           # the same test id twice
                       cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    seed = seed_for("test_draw.py::test_draw")
    assert "2 failed" in r.stdout, r.stdout + r.stderr
    assert r.stdout.count(f"seed {seed} (from the test id") == 2, r.stdout
    draws = [line for line in r.stdout.splitlines() if line.startswith("DRAW")]
    assert len(draws) == 2 and draws[0] == draws[1], draws
