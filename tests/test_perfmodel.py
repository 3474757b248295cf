"""rmt_fast.perfmodel (``rmt-fast plan``): the arithmetic against hand-computed cases, and the memory model
against the tensors the engine really allocates on the CPU for the same shapes."""
import dataclasses
import json
import subprocess
import sys
import weakref

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import BertConfig

from helpers import make_model
from rmt_fast.engine import graphs, runner
from rmt_fast.engine.plan import InferencePlan
from rmt_fast.perfmodel import devices, estimate, parse_size
from rmt_fast.perfmodel.estimate import Dims

# One layer (so it is the pruned last layer): T = 6 positions, M = 2 memory rows, H = 8, 2 heads, F = 16.
TOY = Dims(layers=1, hidden=8, heads=2, ffn=16, vocab=10, positions=12, mem=2, input_size=6, labels=3)


def fake_device(flops=1e3, bandwidth=1e30, overhead=0.0):
    return devices.DeviceSpec("fake", "cpu", {"float32": flops}, bandwidth, 10 ** 9, attention_flops=None,
                              op_overhead_s=overhead, measured=True)


def test_one_layer_flops_by_hand():
    ops = {op.name: op for op in estimate.op_list(TOY, 1, "float32")}
    p = "layer 0 (read rows)"
    # R = M + 1 = 3 rows read; matmuls count 2 FLOPs per multiply-add.
    assert ops[f"{p} Q"].flops == 2 * 3 * 8 * 8 == 384
    assert ops[f"{p} KV"].flops == 2 * 6 * 16 * 8 == 1536
    assert ops[f"{p} attention"].flops == 2 * 3 * 6 * 8 * 2 + 3 * 2 * 3 * 6 == 684   # QK^T, PV, softmax
    assert ops[f"{p} out proj"].flops == 384
    assert ops[f"{p} FFN in"].flops == ops[f"{p} FFN out"].flops == 2 * 3 * 16 * 8 == 768
    assert ops["pooler"].flops == 2 * 8 * 8 == 128
    assert ops["classifier"].flops == 2 * 3 * 8 == 48
    assert sum(op.flops for op in ops.values()) == 4700
    # A GEMM reads x, w, b once and writes y: 4 bytes * (3*8 + 8*8 + 8 + 3*8).
    assert ops[f"{p} Q"].bytes == 4 * 120
    assert ops[f"{p} activation"].bytes == 4 * 3 * 16 * 2       # unfused GELU: read + write [3, 16]
    # Batch scales every op's FLOPs linearly.
    assert sum(op.flops for op in estimate.op_list(TOY, 5, "float32")) == 5 * 4700


def test_full_layers_use_the_flop_counter_terms():
    two = dataclasses.replace(TOY, layers=2)
    ops = {op.name: op for op in estimate.op_list(two, 2, "float32")}
    # Full layer over T = 6 rows, batch 2: QKV 2*6*24*8, attention 2*2*6*6*8 + 3*2*6*6, out 2*6*8*8.
    assert ops["layer 0 QKV"].flops == 2 * 2 * 6 * 24 * 8
    assert ops["layer 0 attention"].flops == 2 * (2 * 2 * 6 * 6 * 8 + 3 * 2 * 6 * 6)
    assert ops["layer 0 out proj"].flops == 2 * 2 * 6 * 8 * 8
    assert ops["layer 0 FFN in"].flops + ops["layer 0 FFN out"].flops == 2 * 2 * 6 * 2 * 8 * 16
    assert sum(op.flops for op in ops.values()) == 2 * 4700 + 2 * (2 * 6 * 24 * 8 + 2 * 6 * 6 * 8 * 2
                                                                     + 3 * 2 * 6 * 6 + 2 * 6 * 8 * 8 + 2 * 2 * 6 * 8 * 16)


def test_roofline_time_by_hand():
    ops = estimate.op_list(TOY, 1, "float32")
    # Compute-bound device (infinite bandwidth, 1000 FLOP/s, no overhead): 4700 FLOPs -> 4.7 s.
    assert estimate.step_seconds(TOY, 1, "float32", fake_device()) == pytest.approx(4.7)
    # Bandwidth-bound device: every op's bytes at 1000 B/s.
    slow_mem = fake_device(flops=1e30, bandwidth=1e3)
    assert estimate.step_seconds(TOY, 1, "float32", slow_mem) == pytest.approx(sum(op.bytes for op in ops) / 1e3)
    # Per-op overhead: launches * overhead on top.
    with_overhead = fake_device(overhead=0.5)
    assert estimate.step_seconds(TOY, 1, "float32", with_overhead) == pytest.approx(
        4.7 + 0.5 * sum(op.launches for op in ops))
    # Each op takes the longer of its two bounds, not their sum.
    gemm = next(op for op in ops if op.name.endswith(" Q"))
    both = fake_device(flops=1e3, bandwidth=1e3)
    assert estimate.op_seconds(gemm, both, "float32", False) == pytest.approx(max(384, 480) / 1e3)


def test_prediction_object_and_totals():
    out = estimate.predict(TOY, fake_device(), batch=2, dtype="float32", segments=10)
    assert out["ms_per_step"] == pytest.approx(2 * 4700)            # 9.4 s per step of 2 rows
    assert out["ms_per_segment"] == pytest.approx(4700)
    assert out["seconds_total"] == pytest.approx(10 * 9.4)
    assert out["peak_bytes"] == sum(out["memory_parts"].values())
    for key in ("ms_per_segment", "peak_bytes", "max_batch", "seconds_total"):
        assert key in out


def test_gpu_spec_needs_a_native_dtype():
    with pytest.raises(ValueError, match="no bfloat16"):
        estimate.predict(estimate.bert_base(), devices.lookup("1080ti"), 1, "bfloat16")


# -- memory against the real tensors ---------------------------------------------------------------------

class LiveBytes(TorchDispatchMode):
    """Bytes of storages created by ops inside the mode, alive at once: the running peak."""

    def __init__(self, ignore):
        super().__init__()
        self.ignore, self.refs, self.size, self.now, self.peak = set(ignore), {}, {}, 0, 0

    def _drop(self, key, tid):
        refs = self.refs.get(key)
        if refs is not None:
            refs.discard(tid)
            if not refs:
                del self.refs[key]
                self.now -= self.size.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                key = t.untyped_storage().data_ptr()
                if key in self.ignore:
                    continue
                if key not in self.refs:
                    self.refs[key], self.size[key] = set(), t.untyped_storage().nbytes()
                    self.now += self.size[key]
                    self.peak = max(self.peak, self.now)
                self.refs[key].add(id(t))
                weakref.finalize(t, self._drop, key, id(t))
        return out


def _tensors(obj, seen=None):
    """Every tensor reachable from the plan's attributes (weights and tables)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x, seen)
    elif hasattr(obj, "__dict__") and id(obj) not in seen:
        seen.add(id(obj))
        for k, v in vars(obj).items():
            if not k.startswith("_"):
                yield from _tensors(v, seen)


@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_memory_matches_the_allocated_tensors(layers, dtype):
    bc = BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                    intermediate_size=256, max_position_embeddings=80)
    model = make_model(bc, num_mem_tokens=4, input_size=64, cls_token_id=1, sep_token_id=2, pad_token_id=0)
    plan = InferencePlan(model, torch.device("cpu"), getattr(torch, dtype), attention="sdpa", packed_weights=False)
    dims = Dims(layers, 64, 4, 256, 50, 80, 4, 64, 6, fused_act=False)
    B = 3
    parts = estimate.memory_parts(dims, B, dtype, cuda=False)
    held = {t.data_ptr(): t.nbytes for t in _tensors(plan)}     # views (last layer's q, kv) count apart
    assert parts["weights"] == sum(held.values())
    storages = {t.untyped_storage().data_ptr() for t in _tensors(plan)}

    ids = torch.randint(3, 50, (B, 64))
    memory = plan.initial_memory.expand(B, -1, -1).clone()                       # [B, M, H] float32
    assert parts["gathered memory"] == memory.nbytes
    with torch.inference_mode(), LiveBytes(set(storages) | {ids.data_ptr(), memory.data_ptr()}) as live:
        plan.step(ids, memory, None)
    assert parts["activations"] == live.peak

    step_runner = graphs.StepRunner(plan, B, runner.steps_per_chunk(B), runner.RING, use_graphs=False)
    assert parts["memory state"] == step_runner.state.nbytes
    assert parts["result rows"] == step_runner.results.nbytes
    cuda_parts = estimate.memory_parts(dims, B, dtype, cuda=True)
    assert cuda_parts["device ring (ids + meta)"] == step_runner.ring_ids.nbytes + step_runner.ring_meta.nbytes
    assert (estimate.RING, estimate.STEPS_PER_CHUNK) == (runner.RING, runner.STEPS_PER_CHUNK)
    from rmt_fast.engine.steprows import FIELDS
    assert estimate.META_FIELDS == FIELDS


def test_cuda_parts_and_max_batch():
    d = estimate.bert_base()
    parts = estimate.memory_parts(d, 4, "bfloat16", cuda=True)
    assert parts["CUDA context"] > 0 and parts["cuBLAS workspace"] > 0
    C = max(8, min(estimate.STEPS_PER_CHUNK, 512 // 4))
    assert parts["device ring (ids + meta)"] == 8 * estimate.RING * C * 4 * (512 + 6)
    budget = 3 * 2 ** 30
    b = estimate.max_batch(d, "bfloat16", True, budget)
    assert b >= 1
    assert estimate.peak_bytes(d, b, "bfloat16", True) <= budget < estimate.peak_bytes(d, b + 1, "bfloat16", True)
    assert estimate.max_batch(d, "bfloat16", True, estimate.peak_bytes(d, 1, "bfloat16", True) - 1) == 0


def test_parse_size():
    assert parse_size("10GiB") == 10 * 2 ** 30
    assert parse_size("500 MB") == 500 * 10 ** 6
    assert parse_size("1.5e9") == 1_500_000_000
    with pytest.raises(ValueError, match="--max-memory"):
        parse_size("lots")


def _plan_cli(*args):
    return subprocess.run([sys.executable, "-m", "rmt_fast", "plan", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_json_and_errors():
    proc = _plan_cli("--device", "h200", "--batch", "8", "--max-memory", "10GiB", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["max_memory"] == 10 * 2 ** 30 and out["peak_bytes"] <= out["max_memory"]
    assert out["seconds_total"] == pytest.approx(4096 * out["ms_per_segment"] * 8 / 1000)
    assert out["device_spec"]["source"]
    bad = _plan_cli("--device", "h300")
    assert bad.returncode == 2 and "--device" in bad.stderr
    bad = _plan_cli("--device", "1080ti", "--dtype", "bf16")
    assert bad.returncode == 2 and "--dtype" in bad.stderr


def test_cpu_probe_runs_the_engines_kernels():
    dev = devices.probe_cpu(dtypes=("float32",), hidden=128, ffn=256, tokens=64, heads=2)
    assert dev.measured and dev.flops["float32"] > 0 and dev.attention_flops["float32"] > 0
    assert dev.bandwidth > 0 and dev.op_overhead_s > 0
