"""Shared test set-up: skip markers defined once, seeds, and Triton's interpreter on machines without a GPU.

TRITON_INTERPRET must be set before anything imports triton, hence here, at collection time.
"""
import faulthandler
import os
import random
import zlib

import numpy as np
import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Engine's dtype="auto" means bfloat16 on a CPU with native bf16 and on sm_80+ GPUs; the tests compare
# with the float32 oracle, so auto is pinned to float32 here (and in subprocesses); test_device_policy.py
# unpins it where it tests auto itself.
os.environ.setdefault("RMT_FAST_AUTO_DTYPE", "float32")

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

# Every random draw in a test is seeded from the test's id, so a failure reproduces exactly (the seed is
# printed with it). RMT_FAST_TEST_SEED=<int> salts every seed to explore other draws.
SEED_SALT = int(os.environ.get("RMT_FAST_TEST_SEED", "0"))


def seed_for(nodeid: str) -> int:
    return (zlib.crc32(nodeid.encode()) ^ SEED_SALT) & 0x7FFFFFFF


@pytest.fixture(autouse=True)
def test_seed(request):
    """The seed of this test's torch, numpy and ``random`` draws (derived from its id)."""
    seed = seed_for(request.node.nodeid)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield seed


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        seed = dict(item.user_properties).get("seed")
        if seed is not None:
            report.sections.append(("seed", f"seed {seed} (from the test id; RMT_FAST_TEST_SEED={SEED_SALT})"))
    return report


@pytest.fixture
def watchdog():
    """A test that could hang (threads, pipes, signals) dumps every thread's stack and exits after 180 s."""
    faulthandler.dump_traceback_later(180, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def tokenizer():
    """bert-base-cased's WordPiece tokenizer, from the vocabulary shipped in rmt_fast/data."""
    from helpers import ASSETS
    from rmt_fast.tokenize import load_tokenizer
    return load_tokenizer(ASSETS)
