"""Time and memory of the Engine's segment step, predicted from its exact op list and a device's rates.

Time: each op of one step (``op_list``, in the order ``InferencePlan.step`` runs them) takes the longer of
its FLOPs at the device's rate and its bytes at the device's bandwidth (a roofline), plus a fixed host cost
per op or kernel launched eagerly (every op on the CPU; on CUDA a smaller per-kernel gap when the step
replays from a CUDA graph). FLOPs of the full layers come from ``analysis.flops.forward_flops`` (Hoffmann
et al. appendix F, matmuls counted 2 * m * n * k); the pruned last layer, pooler and classifier are counted
the same way for their real row counts.

Memory: what the Engine holds on the device (``memory_parts``): the plan's weights (float32 embedding
tables, the layers in the compute dtype), per slot the memory state, result rows and the
feeder's device ring, one step's live activations at that width, with CUDA graphs the graph pool (one
more step's activations), a workspace and the CUDA context. None of it grows with document length, so
``max_batch`` (the most slots a budget holds; ``Engine(max_memory=...)`` uses it) holds for any length.
The feeder's host ring and the host result rows are host memory and not counted.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Union

from ..analysis.flops import ModelShape, forward_flops
from ..chunking import RING, STEPS_PER_CHUNK, steps_per_chunk
from .devices import DeviceSpec

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# Assumed, not measured (the first GPU loan measures them; docs/PERF.md): the fraction of the spec-sheet
# peak the engine's GEMMs and attention kernel reach, and of the bandwidth its memory-bound ops reach.
GPU_EFFICIENCY = {"gemm": 0.7, "attention": 0.4, "memory": 0.8}
EAGER_LAUNCH_S = 8e-6        # torch's host cost per eager CUDA kernel (dispatch + launch)
GRAPH_LAUNCH_S = 1.5e-6      # gap per kernel when replayed from a CUDA graph
CUDA_CONTEXT_BYTES = 500 * 2 ** 20   # driver context + torch's kernels, outside the caching allocator
CUBLAS_WORKSPACE_BYTES = 8 * 2 ** 20 + 8 * 16 * 2 ** 10   # torch's default ":4096:2:16:8"
META_FIELDS = 6                      # engine.steprows.FIELDS: int64 meta fields per row of a step


@dataclass(frozen=True)
class Dims:
    """The sizes the step depends on (bert-family backbone + RMT layout)."""

    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    positions: int
    mem: int          # memory tokens M
    input_size: int   # positions per segment T
    labels: int
    fused_act: bool = False   # the FFN activation runs inside the GEMM (oneDNN packed, CPU)

    @property
    def shape(self) -> ModelShape:
        return ModelShape("step", self.layers, self.hidden, self.heads, self.ffn, self.vocab)


def dims_from_model_dir(path: Union[str, Path], fused_act: bool = False) -> Dims:
    """Dims from an rmt_fast model folder (config.json with 'rmt' and 'backbone')."""
    cfg_path = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
    if not cfg_path.is_file():
        raise FileNotFoundError(f"--model {path}: no config.json there")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if "rmt" not in cfg or "backbone" not in cfg:
        raise ValueError(f"--model {path}: config.json is not an rmt_fast model config (needs 'rmt' and 'backbone')")
    r, b = cfg["rmt"], cfg["backbone"]
    return Dims(b["num_hidden_layers"], b["hidden_size"], b["num_attention_heads"], b["intermediate_size"],
                b["vocab_size"], b["max_position_embeddings"], r["num_mem_tokens"], r["input_size"],
                r["num_labels"], fused_act)


def dims_of(rmt_config, bert_config, fused_act: bool = False) -> Dims:
    """Dims from a loaded model's RMTConfig and its backbone's BertConfig."""
    b = bert_config
    return Dims(b.num_hidden_layers, b.hidden_size, b.num_attention_heads, b.intermediate_size, b.vocab_size,
                b.max_position_embeddings, rmt_config.num_mem_tokens, rmt_config.input_size,
                rmt_config.num_labels, fused_act)


def bert_base(layers: int = 12, fused_act: bool = False) -> Dims:
    """The built-in bert-base-cased shape (rmt-fast bench's model): 512 positions, 10 memory tokens."""
    return Dims(layers, 768, 12, 3072, 28996, 512, 10, 512, 6, fused_act)


@dataclass(frozen=True)
class Op:
    name: str
    kind: str         # "gemm", "attention" or "memory"
    flops: int
    bytes: int
    launches: int = 1


def _gemm(name: str, m: int, n: int, k: int, e: int, flops: Optional[int] = None) -> Op:
    """y[m, n] = x[m, k] @ w[n, k]^T + b: reads x, w, b once, writes y."""
    return Op(name, "gemm", 2 * m * n * k if flops is None else flops, e * (m * k + n * k + n + m * n))


def _elementwise(name: str, elems: int, e: int, reads: int, launches: int = 1) -> Op:
    return Op(name, "memory", 0, e * elems * (reads + 1), launches)


def op_list(d: Dims, batch: int, dtype: str) -> List[Op]:
    """Every op of one engine step for ``batch`` rows, in order."""
    e, B, T, H, F, M = DTYPE_BYTES[dtype], batch, d.input_size, d.hidden, d.ffn, d.mem
    R = M + 1                      # rows the last layer reads: [CLS] + memory
    N = B * T                      # token rows of a full layer
    one = forward_flops(dataclasses.replace(d.shape, n_layers=1), T, include_embeddings=False,
                        include_logits=False)
    ops = [Op("memory gather", "memory", 0, 4 * B * M * H * 5, 2),
           Op("embed + LayerNorm", "memory", 0, N * (8 + 4 * H + e * H) + 4 * T * H + 4 * B * M * H)]

    def tail(prefix, rows):
        out = [_elementwise(f"{prefix} residual + LayerNorm", rows * H, e, 2, 2),
               _gemm(f"{prefix} FFN in", rows, F, H, e)]
        if not d.fused_act:
            out.append(_elementwise(f"{prefix} activation", rows * F, e, 1))
        out += [_gemm(f"{prefix} FFN out", rows, H, F, e), _elementwise(f"{prefix} residual + LayerNorm 2", rows * H, e, 2, 2)]
        return out

    for i in range(d.layers - 1):
        p = f"layer {i}"
        ops += [_gemm(f"{p} QKV", N, 3 * H, H, e, B * one["kqv"]),
                Op(f"{p} attention", "attention",
                   B * (one["attention_logits"] + one["softmax"] + one["reduction"]), e * N * 4 * H),
                _gemm(f"{p} out proj", N, H, H, e, B * one["output_projection"]), *tail(p, N)]
    p = f"layer {d.layers - 1} (read rows)"
    ops += [_gemm(f"{p} Q", B * R, H, H, e), _gemm(f"{p} KV", N, 2 * H, H, e),
            Op(f"{p} attention", "attention", B * (4 * R * T * H + 3 * d.heads * R * T), e * (B * R * 2 * H + N * 2 * H)),
            _gemm(f"{p} out proj", B * R, H, H, e), *tail(p, B * R),
            _gemm("pooler", B, H, H, e), _elementwise("tanh", B * H, e, 1),
            _gemm("classifier", B, d.labels, H, e),
            Op("memory write + logits scatter", "memory", 0, B * M * H * (e + 4) + 8 * B * d.labels, 3)]
    return ops


def op_seconds(op: Op, dev: DeviceSpec, dtype: str, graphs: bool) -> float:
    """Roofline time of one op plus its launch cost."""
    eff = {"gemm": 1.0, "attention": 1.0, "memory": 1.0} if dev.measured else GPU_EFFICIENCY
    if op.kind == "attention" and dev.attention_flops:
        rate = dev.attention_flops[dtype] * eff["attention"]
    else:
        rate = dev.flops.get(dtype, 0.0) * eff["gemm" if op.kind == "gemm" else "attention"]
    if op.flops and rate <= 0:
        raise ValueError(f"{dev.name} has no {dtype} matmul rate (not native there); choose another --dtype")
    compute = op.flops / rate if op.flops else 0.0
    memory = op.bytes / (dev.bandwidth * eff["memory"])
    if dev.kind == "cuda":
        per_launch = GRAPH_LAUNCH_S if graphs else EAGER_LAUNCH_S
    else:
        per_launch = dev.op_overhead_s
    return max(compute, memory) + per_launch * op.launches


def step_seconds(d: Dims, batch: int, dtype: str, dev: DeviceSpec, graphs: Optional[bool] = None) -> float:
    graphs = dev.kind == "cuda" if graphs is None else graphs
    return sum(op_seconds(op, dev, dtype, graphs) for op in op_list(d, batch, dtype))


def memory_parts(d: Dims, batch: int, dtype: str, cuda: bool, graphs: Optional[bool] = None) -> Dict[str, int]:
    """Device bytes the Engine holds at ``batch`` slots (the static CUDA loop's buffers where ``cuda``;
    ``graphs``, default ``cuda``: the steps are replayed from CUDA graphs, whose pool is counted)."""
    e, B, T, H, F, M = DTYPE_BYTES[dtype], batch, d.input_size, d.hidden, d.ffn, d.mem
    # float32 (plan.py): word embeddings of the vocabulary plus the M memory tokens RMT appends, positions,
    # token type 0, the embedding LayerNorm and the initial memory.
    tables = 4 * ((d.vocab + M) * H + d.positions * H + H + 2 * H + M * H)
    layer = e * (3 * H * H + 3 * H + H * H + H + 2 * H + F * H + F + H * F + H + 2 * H)
    heads = e * (H * H + H + d.labels * H + d.labels)                          # pooler, classifier
    C = steps_per_chunk(B)
    per_slot = {"memory state": 4 * B * M * H,
                "result rows": 4 * (RING * C * B + 1) * d.labels}
    if cuda:
        # graphs.StepRunner's device ring, which the feeder copies into and the graphs read: int64 ids
        # [RING, C, B, T] and meta [RING, C, META_FIELDS, B].
        per_slot["device ring (ids + meta)"] = 8 * RING * C * B * (T + META_FIELDS)
    # Live at the peak of plan.step, inside a middle layer's FFN (the embedding output is freed once the
    # first layer has read it): the layer's input, its QKV, attention output, post-attention hidden, then FFN in with FFN out, or (GELU
    # unfused) the activation's input and output. The last layer holds K/V over T rows, the rest over M + 1.
    ffn_live = F + H if d.fused_act else max(F + H, 2 * F)
    R = M + 1
    last = T * 3 * H + R * (3 * H + ffn_live)
    middle = T * (H + 3 * H + H + H + ffn_live) if d.layers > 1 else 0
    parts = {"weights": tables + d.layers * layer + heads, **per_slot,
             "gathered memory": 4 * B * M * H, "activations": e * B * max(middle, last)}
    if cuda:
        parts["graph warm-up copies"] = per_slot["memory state"] + per_slot["result rows"] + 8   # + the cursor
        if cuda if graphs is None else graphs:
            # The captured steps' intermediates live in the graphs' private pool, on top of the eager
            # warm-up's, which the caching allocator keeps reserved; every width shares one pool.
            parts["graph pool"] = parts["gathered memory"] + parts["activations"]
        parts["cuBLAS workspace"] = CUBLAS_WORKSPACE_BYTES
        parts["CUDA context"] = CUDA_CONTEXT_BYTES
    return parts


def peak_bytes(d: Dims, batch: int, dtype: str, cuda: bool, graphs: Optional[bool] = None) -> int:
    return sum(memory_parts(d, batch, dtype, cuda, graphs).values())


def max_batch(d: Dims, dtype: str, cuda: bool, budget: int, limit: int = 1 << 16,
              graphs: Optional[bool] = None) -> int:
    """The largest batch (<= ``limit``) whose peak fits ``budget`` bytes, 0 if not even one slot does.

    A bisection: the peak grows with the batch (a slot's activations outweigh the few ring rows that
    ``steps_per_chunk``'s rounding saves; tests/test_memory_model.py checks this for bert-base)."""
    def fits(b: int) -> bool:
        return peak_bytes(d, b, dtype, cuda, graphs) <= budget

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def predict(d: Dims, dev: DeviceSpec, batch: int, dtype: str, segments: int = 4096,
            max_memory: Optional[int] = None, graphs: Optional[bool] = None) -> dict:
    """One object: time per segment and step, peak memory (and its parts), the largest batch, total time.

    ``segments``: each of the ``batch`` documents has this many segments; they run side by side, one step
    per segment, so the total is ``segments`` steps.
    """
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"--dtype {dtype!r}: choose float32, float16 or bfloat16")
    if batch < 1 or segments < 1:
        raise ValueError("--batch and --segments must be positive")
    cuda = dev.kind == "cuda"
    graphs = cuda if graphs is None else graphs
    step = step_seconds(d, batch, dtype, dev, graphs)
    parts = memory_parts(d, batch, dtype, cuda, graphs)
    budget = dev.memory_bytes if max_memory is None else max_memory
    return {"device": dev.name, "dtype": dtype, "batch": batch, "segments": segments, "graphs": graphs,
            "ms_per_step": 1e3 * step, "ms_per_segment": 1e3 * step / batch,
            "seconds_total": step * segments, "peak_bytes": sum(parts.values()), "memory_parts": parts,
            "max_memory": budget, "max_batch": max_batch(d, dtype, cuda, budget, graphs=graphs),
            "flops_per_step": sum(op.flops for op in op_list(d, batch, dtype)), "predicted": True,
            "assumptions": None if dev.measured else {"efficiency": GPU_EFFICIENCY, "context_bytes":
                                                      CUDA_CONTEXT_BYTES if cuda else 0}}
