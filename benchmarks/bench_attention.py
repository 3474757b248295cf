"""Fused Triton attention against SDPA (flash, memory-efficient, math) and eager attention, on a GPU.

    python benchmarks/bench_attention.py [--dtype bfloat16] [--out benchmarks/results/attention.json]

Shapes are the ones the Engine runs over bert-base with the report's model: a block of T = input_size = 512
rows ([CLS], 10 memory rows, [SEP], 499 text tokens, [SEP]), 12 heads, head_dim 64, batch 1, 8 and 32;
"full" segments (no key mask), "padded" ones (a document's last, partial segment: per-document key
lengths), and the "subset" mode of the last layer (11 query rows, [CLS] + memory, against the whole block). Every provider starts from the
same strided views of a fused QKV output and ends with [B, Tq, heads * head_dim], the layout the output
projection reads, so layout changes are part of the measured time.

TFLOP/s counts the dense work 4 * B * heads * Tq * Tk * head_dim for every provider (padding included),
so across providers it is a speed ratio. Times are triton.testing.do_bench medians (L2 flushed between
runs) and, with --cudagraph, do_bench_cudagraph medians (no launch overhead, as the engine replays graphs).
On a machine without a GPU it says so and exits 0.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from attention_reference import attention_reference  # noqa: E402  the float64 oracle of every test

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "attention.json"
MEMORY_ROWS = 10
PROVIDERS = ["triton", "sdpa_flash", "sdpa_efficient", "sdpa_math", "eager"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--seqlens", type=int, nargs="+", default=[512], help="block lengths T (the Engine: input_size)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    p.add_argument("--cudagraph", action="store_true", help="also time each call replayed in a CUDA graph")
    p.add_argument("--summary", type=Path, metavar="JSON",
                   help="only print the short table of a saved results file (works without a GPU)")
    return p.parse_args(argv)


def key_lengths_for(b: int, t: int, device) -> torch.Tensor:
    """A padded batch: every document on its partial segment, lengths spread over [t/2, t)."""
    return torch.tensor([t - 1 - (i * 97) % (t // 2) for i in range(b)], dtype=torch.int32, device=device)


def make_providers(q, k, v, kl, scale):
    """Callables that each compute [B, Tq, H*D] from the same strided views; None where unsupported."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from rmt_fast.kernels.attention import attention

    b, tq, h, d = q.shape
    tk = k.shape[1]
    out = torch.empty(b, tq, h * d, device=q.device, dtype=q.dtype)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, D] views, no copies
    mask = None
    if kl is not None:
        mask = (torch.arange(tk, device=q.device)[None, :] < kl[:, None].long())[:, None, None, :]  # [B,1,1,Tk]

    def triton_fn():
        return attention(q, k, v, key_lengths=kl, scale=scale, out=out)

    def sdpa(backend):
        def fn():
            with sdpa_kernel(backend):
                o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
            return o.transpose(1, 2).reshape(b, tq, h * d)
        return fn

    def eager_fn():
        s = torch.matmul(qt, kt.transpose(-1, -2)) * scale  # [B, H, Tq, Tk]
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(p, vt).transpose(1, 2).reshape(b, tq, h * d)

    fns = {
        "triton": triton_fn,
        "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa_efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
        "sdpa_math": sdpa(SDPBackend.MATH),
        "eager": eager_fn,
    }
    # A backend that cannot take this input (flash takes no mask) raises here once, and is left out.
    available, skipped = {}, {}
    for name, fn in fns.items():
        try:
            with warnings.catch_warnings():  # SDPA warns at length about why a backend was not used
                warnings.simplefilter("ignore")
                fn()
            available[name] = fn
        except RuntimeError as err:
            skipped[name] = str(err).splitlines()[0][:120]
    return available, skipped


def bench_case(t, b, mode, args, dtype):
    import triton.testing

    h, d = args.heads, args.head_dim
    device = torch.device("cuda")
    qkv = torch.randn(b, t, 3, h, d, device=device, dtype=dtype)  # the fused projection's output
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    kl = key_lengths_for(b, t, device) if mode == "padded" else None
    if mode == "subset":
        q = q[:, :MEMORY_ROWS + 1]
    scale = 1.0 / math.sqrt(d)
    tq = q.shape[1]
    flops = 4.0 * b * h * tq * t * d
    want = attention_reference(q, k, v, kl, scale)
    fns, skipped = make_providers(q, k, v, kl, scale)
    rows = []
    for name in PROVIDERS:
        row = {"T": t, "batch": b, "mode": mode, "Tq": tq, "provider": name, "dtype": str(dtype).split(".")[-1]}
        if name not in fns:
            row.update(ms=None, tflops=None, skipped=skipped.get(name, "unavailable"))
            rows.append(row)
            continue
        fn = fns[name]
        row["max_abs_err"] = (fn().double() - want).abs().max().item()
        med, lo, hi = triton.testing.do_bench(fn, warmup=25, rep=args.rep, quantiles=[0.5, 0.2, 0.8])
        row.update(ms=med, ms_p20=lo, ms_p80=hi, tflops=flops / (med * 1e-3) / 1e12)
        if args.cudagraph:
            try:
                row["ms_graph"] = triton.testing.do_bench_cudagraph(fn, rep=20, quantiles=[0.5])[0]
            except Exception as err:  # a provider that cannot be captured: recorded, not fatal
                row["ms_graph"] = None
                row["graph_error"] = str(err).splitlines()[0][:120]
        rows.append(row)
    del qkv, fns
    return rows


def fmt(x, spec):
    """format(x, spec), or a dash padded to the same width when there is no value."""
    return format(x, spec) if x is not None else "-".rjust(int(spec.split(".")[0] or 0))


def print_table(rows):
    graph = any("ms_graph" in r for r in rows)
    head = f"{'T':>5} {'B':>3} {'mode':>7} {'provider':>15} {'ms':>9} {'TFLOP/s':>8} {'vs flash':>8}"
    head += f" {'ms graph':>9}" if graph else ""
    head += f" {'max err':>9}"
    print(head)
    print("-" * len(head))
    flash = {(r["T"], r["batch"], r["mode"]): r["ms"] for r in rows if r["provider"] == "sdpa_flash"}
    for r in rows:
        base = flash.get((r["T"], r["batch"], r["mode"]))
        ratio = base / r["ms"] if (base and r["ms"]) else None
        line = (f"{r['T']:>5} {r['batch']:>3} {r['mode']:>7} {r['provider']:>15} {fmt(r['ms'], '9.4f')} "
                f"{fmt(r['tflops'], '8.1f')} {fmt(ratio, '7.2f') + ('x' if ratio else ''):>8}")
        if graph:
            line += f" {fmt(r.get('ms_graph'), '9.4f')}"
        line += f" {fmt(r.get('max_abs_err'), '9.2e')}"
        print(line)


def targets(rows):
    """Issue 3's targets on an H200 in bfloat16, checked against this run; one line each."""
    by = {(r["T"], r["batch"], r["mode"], r["provider"]): r.get("ms") for r in rows}
    lines = []
    for t in sorted({r["T"] for r in rows}):
        tri = by.get((t, 32, "full", "triton"))
        fl = by.get((t, 32, "full", "sdpa_flash"))
        if tri and fl:
            lines.append(f"T={t} B=32 full: triton {tri:.4f} ms vs flash {fl:.4f} ms -> "
                         f"{fl / tri:.2f}x (target >= 1.00x) {'MET' if tri <= fl else 'MISSED'}")
        tri1 = by.get((t, 1, "full", "triton"))
        sd = [by.get((t, 1, "full", p)) for p in PROVIDERS if p.startswith("sdpa")]
        sd = [x for x in sd if x]
        if tri1 and sd:
            best = min(sd)
            lines.append(f"T={t} B=1 full: triton {tri1:.4f} ms vs best SDPA {best:.4f} ms -> "
                         f"{best / tri1:.2f}x (target >= 1.20x) {'MET' if best / tri1 >= 1.2 else 'MISSED'}")
        for b in sorted({r["batch"] for r in rows}):
            full, sub = by.get((t, b, "full", "triton")), by.get((t, b, "subset", "triton"))
            if full and sub:
                lines.append(f"T={t} B={b} subset: {full / sub:.1f}x faster than full "
                             f"(target >= 10x) {'MET' if full / sub >= 10 else 'MISSED'}")
    return lines


def print_summary(path: Path):
    """The short table: per case, Triton against the best SDPA backend, then the issue's targets."""
    data = json.loads(path.read_text())
    meta, rows = data["meta"], data["rows"]
    print(f"# {path.name}: {meta['gpu']}, {meta['dtype']}, autotune={meta['autotune']}")
    print(f"{'T':>5} {'B':>3} {'mode':>7} {'triton ms':>10} {'best sdpa':>16} {'ms':>9} {'speedup':>8}")
    cases = dict.fromkeys((r["T"], r["batch"], r["mode"]) for r in rows)
    for case in cases:
        rs = [r for r in rows if (r["T"], r["batch"], r["mode"]) == case and r.get("ms")]
        tri = next((r["ms"] for r in rs if r["provider"] == "triton"), None)
        sdpa = sorted((r["ms"], r["provider"]) for r in rs if r["provider"].startswith("sdpa"))
        best_ms, best = sdpa[0] if sdpa else (None, "-")
        ratio = best_ms / tri if (tri and best_ms) else None
        print(f"{case[0]:>5} {case[1]:>3} {case[2]:>7} {fmt(tri, '10.4f')} {best:>16} {fmt(best_ms, '9.4f')} "
              f"{fmt(ratio, '7.2f') + ('x' if ratio else ''):>8}")
    for line in data.get("targets", []):
        print(line)


def main(argv=None):
    args = parse_args(argv)
    if args.summary is not None:
        print_summary(args.summary)
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        print("bench_attention: no CUDA GPU here (or TRITON_INTERPRET=1); this benchmark only runs on a GPU. "
              "Nothing measured.")
        return 0
    try:
        import triton
    except ImportError:
        print("bench_attention: triton is not installed; nothing measured.")
        return 0
    from rmt_fast.kernels.attention import why_not

    dtype = getattr(torch, args.dtype)
    probe = torch.empty(1, 1, 1, args.head_dim, device="cuda", dtype=dtype)
    reason = why_not(probe, probe, probe)
    if reason is not None:
        print(f"bench_attention: the Triton kernel cannot run here: {reason}")
        return 1

    rows = []
    started = time.time()
    for t in args.seqlens:
        for b in args.batches:
            for mode in ("full", "padded", "subset"):
                rows.extend(bench_case(t, b, mode, args, dtype))
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "dtype": args.dtype, "heads": args.heads,
        "head_dim": args.head_dim, "autotune": os.environ.get("RMT_FAST_TRITON_AUTOTUNE", "0"),
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": round(time.time() - started, 1),
    }
    print(f"# {meta['gpu']}, {args.dtype}, heads {args.heads}, head_dim {args.head_dim}, "
          f"torch {meta['torch']}, triton {meta['triton']}, autotune={meta['autotune']}")
    print_table(rows)
    summary = targets(rows)
    print()
    for line in summary:
        print(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")   # atomic: a reader never sees half a file
    tmp.write_text(json.dumps({"meta": meta, "rows": rows, "targets": summary}, indent=1))
    os.replace(tmp, args.out)
    print(f"\nsaved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
