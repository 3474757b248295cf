"""Shared test set-up: skip markers defined once, and Triton's interpreter on machines without a GPU.

TRITON_INTERPRET must be set before anything imports triton, hence here, at collection time.
"""
import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _fresh_seed():
    # Fresh random inputs every run, but a failure prints the seed to reproduce it.
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    yield seed
