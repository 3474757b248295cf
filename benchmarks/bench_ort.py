"""ONNX Runtime's BERT (float32 and dynamic int8) against the Engine (bf16, bf16 + int8), one run.

The same bert-base shape as ``bench_int8.py speed`` (rmt_fast.bench.builtin_model: bert-base-cased
config, random weights): Hugging Face's BertModel is exported with ``torch.onnx.export``, fused with
ONNX Runtime's BERT optimizer (``onnxruntime.transformers.optimizer``, attention / LayerNorm / GELU
fusions; skipped with a note where it fails) and quantized with
``onnxruntime.quantization.quantize_dynamic`` (int8 weights per tensor, uint8 activations
quantized at run time: ONNX Runtime's int8 BERT recipe). Each case runs one 512-token segment per row
(B rows) at ``--threads`` intra-op threads: ORT sessions with intra_op_num_threads, the Engine under
torch.set_num_threads. Cases are interleaved; per case the median and best of ``--reps`` of wall and
process CPU ms, with the load average beside.

onnxruntime and onnx are not project dependencies: without them this prints why and exits 0.
    pip install onnxruntime onnx        # into your own venv
    python benchmarks/bench_ort.py --batch-sizes 1,8 --threads 1 --reps 5 --out R.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_int8 import machine, make_engine  # noqa: E402

from rmt_fast import files  # noqa: E402


def missing() -> str | None:
    for name in ("onnxruntime", "onnx"):
        try:
            __import__(name)
        except ImportError as e:
            return f"{name} is not installed ({e}); `pip install onnxruntime onnx` to run this benchmark"
    return None


def export(model, folder: Path, seq: int) -> dict:
    """model.bert (a Hugging Face BertModel) -> {variant: path}: fp32 (fused where the optimizer
    works) and its dynamic int8 quantization."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    bert = model.bert.eval()                                                     # HF BertModel
    ids = torch.randint(1000, 20000, (1, seq))
    mask = torch.ones(1, seq, dtype=torch.int64)
    raw = folder / "bert.onnx"
    class Encoder(torch.nn.Module):                       # keyword arguments: BertModel's order varies
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    with torch.no_grad():
        torch.onnx.export(Encoder().eval(), (ids, mask), str(raw), input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                          dynamic_axes={"input_ids": {0: "B"}, "attention_mask": {0: "B"},
                                        "last_hidden_state": {0: "B"}})
    notes, fp32 = [], raw
    try:
        from onnxruntime.transformers import optimizer
        cfg = bert.config
        opt = optimizer.optimize_model(str(raw), model_type="bert", num_heads=cfg.num_attention_heads,
                                       hidden_size=cfg.hidden_size)
        fp32 = folder / "bert-opt.onnx"
        opt.save_model_to_file(str(fp32))
        notes.append(f"optimizer fused: {opt.get_fused_operator_statistics()}")
    except Exception as e:                                   # the plain export still runs
        notes.append(f"ORT BERT optimizer not applied ({type(e).__name__}: {e})")
    int8 = folder / "bert-int8.onnx"
    # shape inference cannot type the outputs of ORT's fused (com.microsoft) ops: they are float32
    import onnx
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return {"paths": {"ort_fp32": fp32, "ort_int8": int8}, "notes": notes}


def session(path: Path, threads: int):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    why = missing()
    if why:
        print(f"bench_ort: skipped: {why}")
        return
    import onnxruntime as ort

    from rmt_fast.bench import builtin_model
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = builtin_model(args.layers)
    seq = model.config.input_size             # positions per segment (512), the Engine's segment too
    with tempfile.TemporaryDirectory() as tmp:
        exported = export(model, Path(tmp), seq)
        sessions = {n: session(path, args.threads) for n, path in exported["paths"].items()}
        sizes = {n: path.stat().st_size for n, path in exported["paths"].items()}
        engines = {n: make_engine(model, v) for n, v in (("engine_bf16", "bfloat16"), ("engine_int8", "int8"))}
        rows = []
        for B in args.batch_sizes:
            docs = [torch.randint(1000, 20000, (model.config.segment_size,)) for _ in range(B)]  # 1 segment
            feed = {"input_ids": torch.randint(1000, 20000, (B, seq)).numpy(),
                    "attention_mask": torch.ones(B, seq, dtype=torch.int64).numpy()}
            cases = {**{n: (lambda s=s: s.run(None, feed)) for n, s in sessions.items()},
                     **{n: (lambda e=e: e.classify(docs, batch_size=B)) for n, e in engines.items()}}
            for f in cases.values():
                f()                                                               # warm-up
            wall = {n: [] for n in cases}
            cpu = {n: [] for n in cases}
            loads = []
            for _ in range(args.reps):                                            # interleaved
                for n, f in cases.items():
                    t, c = time.perf_counter(), time.process_time()
                    f()
                    wall[n].append((time.perf_counter() - t) * 1e3)
                    cpu[n].append((time.process_time() - c) * 1e3)
                loads.append(os.getloadavg()[0])
            row = {"batch": B, "loadavg_per_rep": loads,
                   **{n: {"median_ms": statistics.median(wall[n]), "best_ms": min(wall[n]),
                          "median_cpu_ms": statistics.median(cpu[n]), "best_cpu_ms": min(cpu[n]),
                          "all_ms": wall[n], "all_cpu_ms": cpu[n]} for n in cases}}
            rows.append(row)
            print(f"B={B}, {args.threads} thread(s), load {min(loads):.1f}-{max(loads):.1f}: " + "; ".join(
                f"{n} {row[n]['median_ms']:.1f} ms (CPU {row[n]['median_cpu_ms']:.1f})" for n in cases), flush=True)
            base = row["ort_int8"]["median_ms"]
            print("  ORT int8 / case (wall medians): " + ", ".join(
                f"{n} {base / row[n]['median_ms']:.2f}x" for n in cases), flush=True)
    out = {"machine": machine(), "onnxruntime": ort.__version__, "layers": args.layers, "seq": seq,
           "threads": args.threads, "notes": exported["notes"], "onnx_bytes": sizes, "rows": rows,
           "command": "python benchmarks/bench_ort.py " + " ".join(sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    files.write_text(args.out, json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
