"""What the extension's tests share: the devices, the two implementations of each op (the compiled
kernel and its pure-torch twin), and the output tolerance."""
import os

import pytest
import torch

from rmt_fast import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
requires_ext = pytest.mark.skipif(not _ext.available(),
                                  reason=f"rmt_fast._C not available: {_ext.why_unavailable()}")
# Every behavioural test runs on both implementations: "op" is the one op callers call (the compiled
# kernel where built: those cases skip without it), "torch" the twin called directly.
IMPLS = [pytest.param("op", marks=requires_ext), "torch"]
FNS = {
    "op": (_ext.segment_embed, _ext.memory_write),
    "torch": (_ext.segment_embed_torch, _ext.memory_write_torch),
}

# The output is rounded once from float32: allow one unit in the last place of the output dtype.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2**-7, rtol=2**-7),
    torch.float16: dict(atol=2**-10, rtol=2**-10),
}
EPS = 1e-12  # BERT's LayerNorm eps


def device_or_skip(device):
    if device == "cuda" and not _ext.built_with_cuda():
        pytest.skip(_ext.why_unavailable("cuda"))
