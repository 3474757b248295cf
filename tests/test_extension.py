"""The extension's registration: schemas defined once in rmt_fast/_ext.py, the compiled kernels behind
the ops where built, the pure-torch twins registered where rmt_fast._C is missing (one warning), and
torch.library.opcheck on every op. The ops' numbers are tested in test_extension_embed.py,
test_extension_memory_write.py and the attention tests; the sources' compilation in test_extension_compile.py."""
import glob
import os
import subprocess
import sys

import torch

from rmt_fast import _ext

from extension_cases import ROOT, requires_ext
from test_extension_embed import make_embed_inputs


# --- registration, dispatch and import ------------------------------------------------------------

OPS = ("segment_embed", "memory_write", "attention")


def opcheck_every_op():
    """torch.library.opcheck on each op (schema, fake tensor, AOT dispatch), whichever kernels back it."""
    from torch.library import opcheck
    args = make_embed_inputs(3, 13, 10, 31, table_dtype=torch.bfloat16, out_dtype=torch.bfloat16)
    args["ids"][:, 1:11] = 0  # opcheck reruns the op in ways that need no special ids
    opcheck(torch.ops.rmt_fast.segment_embed.default, tuple(args.values()))
    state, hidden, slots = torch.randn(4, 10, 31), torch.randn(3, 12, 31), torch.tensor([3, -1, 0])
    opcheck(torch.ops.rmt_fast.memory_write.default, (state, hidden, 2, slots))
    q, k = torch.randn(2, 5, 2, 32), torch.randn(2, 9, 2, 32)
    for key_lengths in (None, torch.tensor([9, 0])):
        opcheck(torch.ops.rmt_fast.attention.default, (q, k, k.clone(), key_lengths, 0.3))


@requires_ext
def test_opcheck_compiled_kernels():
    opcheck_every_op()


def test_schemas_are_defined_once_in_python():
    assert set(_ext.SCHEMAS) == set(OPS)
    for name, schema in _ext.SCHEMAS.items():
        assert str(getattr(torch.ops.rmt_fast, name).default._schema) == "rmt_fast::" + schema
    assert _ext.SCHEMAS["segment_embed"].endswith("float eps, Tensor(a!) out) -> ()")
    assert _ext.SCHEMAS["memory_write"] == ("memory_write(Tensor(a!) state, Tensor hidden, int row_offset, "
                                            "Tensor slots) -> ()")
    sources = "".join(open(f).read() for f in glob.glob(os.path.join(ROOT, "csrc", "**", "*.*"), recursive=True))
    assert "TORCH_LIBRARY(" not in sources and "m.def(" not in sources  # C++ registers kernels only


@requires_ext
def test_compiled_kernels_back_the_ops():
    for name in OPS:
        dump = torch._C._dispatch_dump(f"rmt_fast::{name}")
        cpu = next(line for line in dump.splitlines() if line.startswith("CPU:"))
        meta = next(line for line in dump.splitlines() if line.startswith("Meta:"))
        assert "csrc" in cpu and "csrc" in meta, dump
    assert _ext.built_with_cuda() == bool(_ext._C.WITH_CUDA)
    if torch.version.cuda is None:
        assert not _ext.built_with_cuda()
        assert "without CUDA kernels" in _ext.why_unavailable("cuda")
    assert _ext.why_unavailable("cpu") is None


WITHOUT_C = r"""
import sys, warnings
sys.path.insert(0, {tests!r})
sys.modules['rmt_fast._C'] = None  # as if it were not built
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    from rmt_fast import _ext
    import rmt_fast._ext
import pytest, torch
from test_extension import opcheck_every_op
from test_extension_embed import BAD_EMBED, make_embed_inputs, _embed_case
assert not _ext.available() and not _ext.built_with_cuda()
assert _ext.attention_why_unavailable() == _ext.why_unavailable()
dump = torch._C._dispatch_dump('rmt_fast::segment_embed')
assert 'CPU: registered at' in dump and 'csrc' not in dump, dump
args = make_embed_inputs(2, 7, 3, 31)
want = _ext.segment_embed_torch(**{{**args, 'out': args['out'].clone()}})
assert torch.equal(_ext.segment_embed(**args), want)
with pytest.raises(RuntimeError, match=r'rmt_fast::segment_embed: memory must have shape'):
    _ext.segment_embed(**_embed_case(BAD_EMBED['memory batch'][0])())
opcheck_every_op()
print('REASON', _ext.why_unavailable())
print('WARNINGS', len(caught))
print(caught[0].message)
"""


def _import_ext_without_C(verbose):
    code = WITHOUT_C.format(tests=os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "RMT_FAST_EXT_VERBOSE": "1" if verbose else "0"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_without_the_extension_the_twins_are_the_ops():
    """No rmt_fast._C: one warning, and the twins registered as the ops (checked, opcheck-clean)."""
    out = _import_ext_without_C(verbose=False)
    assert "REASON rmt_fast._C is not built" in out
    assert "WARNINGS 1" in out
    assert "Using the pure-torch paths instead. Set RMT_FAST_EXT_VERBOSE=1 for details." in out
    assert "Traceback" not in out
    assert "Traceback" in _import_ext_without_C(verbose=True)


def test_a_stale_build_that_defines_the_schemas_still_imports():
    """A _C built before the schemas moved to Python defines them itself (TORCH_LIBRARY): importing
    warns to rebuild instead of failing (simulated by defining the ops before rmt_fast is imported)."""
    code = ("import warnings, torch\n"
            "old = torch.library.Library('rmt_fast', 'DEF')\n"
            "old.define('memory_write(Tensor(a!) state, Tensor hidden, int row_offset, Tensor slots) -> ()')\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    from rmt_fast import _ext\n"
            "print([str(w.message) for w in caught])\n"
            "state = torch.zeros(2, 3, 4)\n"
            "_ext.memory_write(state, torch.ones(1, 3, 4), 0, torch.tensor([1]))\n"
            "assert state[1].eq(1).all() and state[0].eq(0).all()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "built from older sources: it defines memory_write itself; rebuild it" in proc.stdout
