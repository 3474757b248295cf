"""int8 against bf16 and float32 on the CPU: speed (bert-base shape) and drift (the shipped model).

Times are wall clock and process CPU time (on a shared machine, CPU time at one thread is the
cost that time-sharing does not inflate). speed: ms per step (median of --reps) of Engine bfloat16,
bfloat16 + int8 and float32 (--variants), interleaved in one process, on
bert-base-shaped random weights (``rmt_fast.bench.builtin_model``), full 512-token segments, plus the
GEMM weights' bytes against float32.
    python benchmarks/bench_int8.py speed --layers 12 --batch-sizes 1,8 --segments 2 --out R.json

drift: the shipped model (rmt_fast/data/default_model) on Detect & Memorize test documents (seed 1234,
as docs/RESULTS.md), each length's documents classified by every variant; label agreement with float32,
accuracy, and the max |logit - float32 logit| per length.
    python benchmarks/bench_int8.py drift --segments 16,256 --samples 100 --out R.json
Variants: float32; bfloat16; int8 (int8 GEMMs, bf16 elsewhere, the shipped choice); int8-intmm (the
same on the torch._int_mm kernel); int8-attn (also
int8 attention, all layers but the last); int8-all (also the last layer's [CLS]/memory-row GEMMs);
int8-asym (int8 with asymmetric per-token activations); int8-f32 (int8 GEMMs, float32 elsewhere, as
Engine(dtype="float32", quantize="int8") runs them: asymmetric activations); int8-f32-sym (the same with
symmetric activations: the float32 plans' scheme before asymmetric ones were built).
``profile`` gives the self CPU time per torch op of one step (torch.profiler), per variant.
``kernels`` times the FFN-shaped GEMM as bf16 and as int8, with the int8 layer's parts.
``plot`` draws the max logit gap against length from one or more drift JSON files.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from rmt_fast import Engine, files
from rmt_fast.engine import quant

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "rmt_fast" / "data" / "default_model"
VARIANTS = {  # name -> (dtype, quantize, int8 also on the last layer's [CLS]/memory rows, int8 attention,
    #                   int8 GEMM kernel: None = the default, activations: None = the plan's default)
    "float32": ("float32", None, False, False, None, None),
    "bfloat16": ("bfloat16", None, False, False, None, None),
    "int8": ("bfloat16", "int8", False, False, None, None),
    "int8-intmm": ("bfloat16", "int8", False, False, "int_mm", None),
    "int8-attn": ("bfloat16", "int8", False, True, None, None),
    "int8-all": ("bfloat16", "int8", True, False, None, None),
    "int8-asym": ("bfloat16", "int8", False, False, None, "asymmetric"),
    "int8-f32": ("float32", "int8", False, False, None, None),           # asymmetric: float32 plans' default
    "int8-f32-sym": ("float32", "int8", False, False, None, "symmetric"),
}


def make_engine(model, variant: str) -> Engine:
    dtype, quantize, all_rows, int8_attention, kernel, activations = VARIANTS[variant]
    saved = quant.LAST_LAYER_KEPT, quant.INT8_ATTENTION, quant.KERNEL, quant.ACTIVATIONS
    quant.LAST_LAYER_KEPT = () if all_rows else saved[0]
    quant.INT8_ATTENTION, quant.KERNEL, quant.ACTIVATIONS = int8_attention, kernel, activations
    try:
        return Engine(model, dtype=dtype, quantize=quantize)
    finally:
        quant.LAST_LAYER_KEPT, quant.INT8_ATTENTION, quant.KERNEL, quant.ACTIVATIONS = saved


def drift_documents(n_segments: int, n_docs: int, model_dir: Path = DEFAULT_MODEL):
    """The experiments' documents: (model, ids, labels) of Detect & Memorize test samples 0..n_docs-1
    (seed 1234, as ``drift``) at n_segments."""
    from rmt_fast.model import RMTForSequenceClassification
    from rmt_fast.tasks import TaskGenerator, load_tokenizer

    model = RMTForSequenceClassification.from_pretrained(str(model_dir))
    gen = TaskGenerator("detect", load_tokenizer(str(model_dir)), model.config, split="test", seed=1234)
    ids, labels = gen.batch(n_segments, range(n_docs))
    return model, ids, labels


def flips(logits: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor) -> str:
    """One line: label agreement with ref (float32), the documents that differ, logit gaps, accuracy."""
    agree = logits.argmax(1) == ref.argmax(1)
    gap = (logits - ref).abs().max(1).values
    return (f"agree {int(agree.sum())}/{len(agree)}, flipped docs {(~agree).nonzero().flatten().tolist()}, "
            f"max gap {gap.max():.3f}, median gap {gap.median():.4f}, "
            f"accuracy {(logits.argmax(1) == labels).float().mean():.2f}")


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "int8_isa": quant.cpu_int8_isa(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "loadavg": os.getloadavg()}


def gemm_bytes(plan) -> dict:
    """Bytes of the plan's layer GEMM weights (scales and biases included) and their float32 size."""
    got = f32 = 0
    for w in plan.layers:
        for name in quant.GEMM_NAMES:
            lin = getattr(w, name)
            if lin is None:
                continue
            f32 += 4 * (lin.out_features * lin.in_features + lin.out_features)
            got += lin.nbytes if isinstance(lin, quant.Int8Linear) else \
                lin.bias.numel() * lin.bias.element_size() + lin.out_features * lin.in_features * lin.bias.element_size()
    return {"bytes": got, "float32_bytes": f32, "ratio": got / f32}


def speed(args) -> dict:
    from rmt_fast.bench import builtin_model
    torch.manual_seed(0)
    model = builtin_model(args.layers)
    names = args.variants
    engines = {n: make_engine(model, n) for n in names}
    S, rows = model.config.segment_size, []
    med = lambda v: sorted(v)[len(v) // 2]                                    # noqa: E731
    for B in args.batch_sizes:
        docs = [torch.randint(1000, 20000, (S * args.segments,)) for _ in range(B)]
        for e in engines.values():
            e.classify(docs[:B], batch_size=B)                                # warm-up
        times = {n: [] for n in names}
        cpu = {n: [] for n in names}
        loads = []
        for _ in range(args.reps):                                            # interleaved
            for n, e in engines.items():
                t, c = time.perf_counter(), time.process_time()
                e.classify(docs, batch_size=B)
                times[n].append((time.perf_counter() - t) * 1e3 / args.segments)
                cpu[n].append((time.process_time() - c) * 1e3 / args.segments)
            loads.append(os.getloadavg()[0])
        row = {"batch": B, **{f"{n}_ms": med(v) for n, v in times.items()},
               **{f"{n}_cpu_ms": med(v) for n, v in cpu.items()}, "all_ms": times, "all_cpu_ms": cpu,
               "loadavg_per_rep": loads, "statistic": "median"}
        for n in names:
            if n != "int8" and "int8" in names:
                row[f"{n}_over_int8"] = row[f"{n}_ms"] / row["int8_ms"]
                row[f"{n}_over_int8_cpu"] = row[f"{n}_cpu_ms"] / row["int8_cpu_ms"]
        rows.append(row)
        print(f"B={B}, {torch.get_num_threads()} thread(s), load {min(loads):.1f}-{max(loads):.1f}, medians of "
              f"{args.reps}: " + "; ".join(f"{n} wall {row[n + '_ms']:.1f} CPU {row[n + '_cpu_ms']:.1f} ms"
                                          for n in names), flush=True)
        print("  over int8 (wall, CPU): " + ", ".join(
            f"{n} {row[n + '_over_int8']:.2f}x {row[n + '_over_int8_cpu']:.2f}x"
            for n in names if n + "_over_int8" in row),
            flush=True)
    out = {"machine": machine(), "layers": args.layers, "segments": args.segments, "rows": rows,
           "weights": {n: gemm_bytes(e.plan) for n, e in engines.items()}}
    if "int8" in engines:
        out.update(int8_gemms=engines["int8"].plan.int8_gemms, quantize_status=engines["int8"].plan.quantize_status)
    print(json.dumps(out["weights"]))
    return out


def fbgemm_linear(w: torch.Tensor, b: torch.Tensor):
    """fbgemm's dynamic int8 linear (torch.ao dynamic quantization): int8 weights per channel, the
    activation quantized at run time to uint8 with ONE scale and zero point for the whole tensor;
    float32 in and out. None where this torch has no fbgemm."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return None
    torch.backends.quantized.engine = "fbgemm"
    sw = w.abs().amax(1) / 127
    qw = torch.quantize_per_channel(w, sw.double(), torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
    packed = torch.ops.quantized.linear_prepack(qw, b)
    return lambda x: torch.ops.quantized.linear_dynamic(x, packed, True)


def kernels(args) -> dict:
    """The FFN input GEMM (rows x 768 @ 768 x 3072, GELU) as bf16 oneDNN, as Int8Linear on its two
    kernels (int_mm, vnni) and as fbgemm's dynamic int8 linear, and the int_mm layer's parts,
    interleaved; best and median of ``reps`` ms."""
    from rmt_fast import _ext
    from rmt_fast.engine.linear import Linear
    from rmt_fast.engine.quant import Int8Linear, quantize_rows
    M, K, N = args.rows, 768, 3072
    x = torch.randn(M, K).to(torch.bfloat16)
    w, b = torch.randn(N, K) / K ** 0.5, torch.randn(N)
    int8, bf16 = Int8Linear(w, b, "gelu", kernel="int_mm"), Linear(w.to(torch.bfloat16), b.to(torch.bfloat16),
                                                                   "gelu", pack=True)
    blk = min(M, quant.ROW_BLOCK)
    qx, sx = quantize_rows(x[:blk])
    acc = torch._int_mm(qx, int8.qweight_t)
    out = torch.empty(blk, N, dtype=torch.bfloat16)
    n_blocks = -(-M // blk)
    cases = {"bf16 packed GEMM + GELU": lambda: bf16(x), "Int8Linear int_mm + GELU (all below)": lambda: int8(x),
             f"quantize activations ({n_blocks} x {blk} rows)":
                 lambda: [quantize_rows(x[:blk]) for _ in range(n_blocks)],
             f"torch._int_mm ({n_blocks} x {blk} rows)":
                 lambda: [torch._int_mm(qx, int8.qweight_t) for _ in range(n_blocks)],
             f"dequantize + bias + GELU + bf16 ({n_blocks} x {blk} rows)": lambda: [
                 _ext.int8_dequantize(acc, sx, int8.weight_scale, int8.bias, "gelu", out) for _ in range(n_blocks)]}
    if quant.vnni_problem() is None:
        vnni = Int8Linear(w, b, "gelu", kernel="vnni")
        cases["Int8Linear vnni + GELU (micro-kernel, tile epilogue)"] = lambda: vnni(x)
    fbgemm = fbgemm_linear(w, b)
    if fbgemm is not None:
        xf = x.float()
        cases["fbgemm dynamic linear, float32 in/out"] = lambda: fbgemm(xf)
        cases["fbgemm dynamic linear + GELU + bf16 casts"] = \
            lambda: torch.nn.functional.gelu(fbgemm(x.float())).to(torch.bfloat16)
    times = {k: [] for k in cases}
    for f in cases.values():
        f()
    cpu = {k: [] for k in cases}
    for _ in range(args.reps):
        for k, f in cases.items():
            t, c = time.perf_counter(), time.process_time()
            f()
            times[k].append((time.perf_counter() - t) * 1e3)
            cpu[k].append((time.process_time() - c) * 1e3)
    rows = {k: {"best_ms": min(v), "median_ms": sorted(v)[len(v) // 2], "best_cpu_ms": min(cpu[k]),
                "median_cpu_ms": sorted(cpu[k])[len(v) // 2]} for k, v in times.items()}
    for k, r in rows.items():
        print(f"{k:52s} wall best {r['best_ms']:7.2f} median {r['median_ms']:7.2f} ms; "
              f"CPU best {r['best_cpu_ms']:7.2f} median {r['median_cpu_ms']:7.2f} ms")
    return {"machine": machine(), "rows": rows, "shape": [M, K, N]}


def profile(args) -> dict:
    """Self CPU time per torch op of Engine steps (bert-base shape, full 512-token segments), per
    batch size and variant, from torch.profiler: where the int8 step's time goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from rmt_fast.bench import builtin_model
    torch.manual_seed(0)
    model = builtin_model(args.layers)
    S, out = model.config.segment_size, {"machine": machine(), "layers": args.layers, "rows": []}
    for B in args.batch_sizes:
        docs = [torch.randint(1000, 20000, (S,)) for _ in range(B)]
        for n in args.variants:
            engine = make_engine(model, n)
            engine.classify(docs, batch_size=B)                                   # warm-up
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                t = time.process_time()
                engine.classify(docs, batch_size=B)
                cpu_ms = (time.process_time() - t) * 1e3
            ops = sorted(((e.key, e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()),
                         key=lambda r: -r[1])
            total = sum(ms for _, ms, _ in ops)
            out["rows"].append({"batch": B, "variant": n, "cpu_ms": cpu_ms, "profiled_ms": total,
                                "ops": [{"op": k, "self_ms": ms, "calls": c} for k, ms, c in ops],
                                "loadavg": os.getloadavg()})
            print(f"B={B} {n}: step CPU {cpu_ms:.1f} ms (profiled self time {total:.1f} ms; load "
                  f"{os.getloadavg()[0]:.2f})")
            for k, ms, c in ops[:args.top]:
                print(f"  {k:44s} {ms:8.2f} ms {100 * ms / total:5.1f}%  {c:6d} calls")
    return out


def drift(args) -> dict:
    from rmt_fast.model import RMTForSequenceClassification
    from rmt_fast.tasks import TaskGenerator, load_tokenizer
    model = RMTForSequenceClassification.from_pretrained(str(args.model))
    gen = TaskGenerator(args.task, load_tokenizer(str(args.model)), model.config, split="test", seed=1234)
    engines = {n: make_engine(model, n) for n in args.variants}
    rows = []
    for n_seg in args.segments:
        ids, labels = gen.batch(n_seg, range(args.samples))
        logits, secs = {}, {}
        for n, e in engines.items():
            t = time.perf_counter()
            logits[n] = e.classify(ids, batch_size=args.batch_size)
            secs[n] = time.perf_counter() - t
        ref = logits["float32"]
        row = {"segments": n_seg, "samples": args.samples, "seconds": secs}
        for n, lg in logits.items():
            pred = lg.argmax(1)
            row[n] = {"accuracy": (pred == labels).float().mean().item(),
                      "agree_with_float32": (pred == ref.argmax(1)).sum().item(),
                      "max_logit_gap": (lg - ref).abs().max().item(),
                      "mean_logit_gap": (lg - ref).abs().max(1).values.mean().item()}
        row["float32_logit_range"] = [ref.min().item(), ref.max().item()]
        rows.append(row)
        print(f"{n_seg} segments: " + "; ".join(
            f"{n} acc {row[n]['accuracy']:.2f} agree {row[n]['agree_with_float32']}/{args.samples} "
            f"gap {row[n]['max_logit_gap']:.4f}" for n in engines), flush=True)
    return {"machine": machine(), "task": args.task, "model": str(args.model), "rows": rows}


def plot(args) -> None:
    """Two panels against length: each variant's max |logit - float32 logit| (log scale: a document whose
    label flipped shows as a gap near 10), and its documents agreeing with float32 (%)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    merged: dict = {}                                  # segments -> the variants measured (several files)
    for f in args.inputs:
        for r in json.loads(Path(f).read_text())["rows"]:
            merged.setdefault(r["segments"], {}).update(r)
    rows = [merged[k] for k in sorted(merged)]
    fig, (gap_ax, agree_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for n in [v for v in VARIANTS if v != "float32"]:
        have = [r for r in rows if n in r]
        if not have:
            continue
        x = [r["segments"] for r in have]
        gap_ax.plot(x, [r[n]["max_logit_gap"] for r in have], "o-", label=n)
        agree_ax.plot(x, [100 * r[n]["agree_with_float32"] / r["samples"] for r in have], "o-", label=n)
    for ax in (gap_ax, agree_ax):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("segments per document (Detect & Memorize, shipped model)")
        ax.grid(True, alpha=0.3)
    gap_ax.set_yscale("log")
    gap_ax.set_ylabel("max |logit - float32 logit|")
    agree_ax.set_ylabel("documents with float32's label (%)")
    gap_ax.set_title("drift against float32")
    agree_ax.set_title(f"label agreement ({rows[0]['samples'] if rows else 0} documents a length)")
    agree_ax.legend()
    fig.tight_layout()
    tmp = Path(str(args.out) + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, args.out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    ints = lambda s: [int(x) for x in s.split(",")]                        # noqa: E731
    s = sub.add_parser("speed")
    s.add_argument("--layers", type=int, default=12)
    s.add_argument("--batch-sizes", type=ints, default=[1, 8])
    s.add_argument("--segments", type=int, default=2)
    s.add_argument("--reps", type=int, default=3)
    s.add_argument("--variants", type=lambda s: s.split(","), default=["bfloat16", "int8", "float32"])
    k = sub.add_parser("kernels")
    k.add_argument("--rows", type=int, default=512)
    k.add_argument("--reps", type=int, default=15)
    f = sub.add_parser("profile")
    f.add_argument("--layers", type=int, default=12)
    f.add_argument("--batch-sizes", type=ints, default=[1, 8])
    f.add_argument("--variants", type=lambda s: s.split(","), default=["bfloat16", "int8"])
    f.add_argument("--top", type=int, default=14)
    d = sub.add_parser("drift")
    d.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    d.add_argument("--task", default="detect")
    d.add_argument("--segments", type=ints, default=[16, 256])
    d.add_argument("--samples", type=int, default=100)
    d.add_argument("--batch-size", type=int, default=100)
    d.add_argument("--variants", type=lambda s: ["float32", *[v for v in s.split(",") if v != "float32"]],
                   default=list(VARIANTS))
    g = sub.add_parser("plot")
    g.add_argument("inputs", nargs="+")
    for q in (s, k, f, d, g):
        q.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if args.cmd == "plot":
        return plot(args)
    result = {"speed": speed, "kernels": kernels, "profile": profile, "drift": drift}[args.cmd](args)
    result["command"] = "python benchmarks/bench_int8.py " + " ".join(os.sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    files.write_text(args.out, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
