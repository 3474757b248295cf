"""The driver's benchmark: CUDA graphs, the feeder's overlap, end-to-end time and peak memory.

Four measurements, one table each, all saved to ``--out``/driver.json (and driver.png):

1. per-segment time, eager against graphed (graphs exist on CUDA only; the CPU row is eager);
2. many texts through ``classify_texts`` with and without the feeder's overlap (tokenizing and
   laying out on threads while the compute runs, or in turn on the caller's thread);
3. end-to-end time for those texts against max(tokenize alone, compute alone): the feeder's goal
   is end-to-end ~= the larger of the two;
4. peak memory (CUDA allocator on a GPU, RSS on the CPU) and time against length, one document
   of 1, 16, 256, 4096 segments;
5. (``--stream-chars N``) one text of N characters streamed through ``classify_stream`` with left
   alignment and read whole with right alignment: host RSS (and device) peak of each.

The model is the built-in bert-base-cased shape with random weights (rmt_fast.bench.builtin_model).
Defaults are small so it runs on a CPU in about a minute; for a GPU, e.g.:

    python benchmarks/bench_driver.py --device cuda --dtype bfloat16 --layers 12 \\
        --batch-sizes 1,32 --memory-segments 1,16,256,4096 --docs 256 --doc-chars 20000
"""
from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import torch

from rmt_fast.bench import PeakMemory, builtin_model, plot
from rmt_fast.engine import Engine
from rmt_fast.tokenize import load_tokenizer, tokenize_long

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "rmt_fast" / "data"


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def _texts(n: int, chars: int, seed: int = 0):
    novels = sorted((DATA / "noise").glob("*.txt.gz"))
    corpus = " ".join(gzip.open(p, "rt", encoding="utf-8").read() for p in novels[:2])
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(corpus) - chars, (n,), generator=g).tolist()
    return [corpus[s:s + chars] for s in starts]


def per_segment(model, args, batch_size: int) -> dict:
    """ms per segment, eager and graphed, on ``batch_size`` documents of ``--segments`` full segments."""
    cfg = model.config
    docs = [torch.randint(1000, cfg.vocab_size, (args.segments * cfg.segment_size,)) for _ in range(batch_size)]
    row = {"batch_size": batch_size, "segments": args.segments}
    modes = [("eager", False)] + ([("graphed", True)] if torch.device(args.device).type == "cuda" else [])
    for name, graphed in modes:
        engine = Engine(model, args.device, args.dtype, args.attention, cuda_graphs=graphed)
        engine.classify([d[:2 * cfg.segment_size] for d in docs], batch_size=batch_size)      # warm-up/capture
        best = min(_timed(lambda: engine.classify(docs, batch_size=batch_size), args.device)[0]
                   for _ in range(args.repeats))
        row[f"{name}_ms_per_segment"] = 1000 * best / (args.segments * batch_size)
        row[f"{name}_status"] = engine.graphs_status
    if "graphed_ms_per_segment" in row:
        row["graph_speedup"] = row["eager_ms_per_segment"] / row["graphed_ms_per_segment"]
    return row


def end_to_end(model, tokenizer, args, texts) -> dict:
    """Tokenize alone, compute alone, then both through the feeder with and without overlap."""
    from rmt_fast.engine.feeder import Feeder
    from rmt_fast.engine.schedule import ChunkLayout
    from rmt_fast.engine.sources import TextSource

    cfg = model.config
    engine = Engine(model, args.device, args.dtype, args.attention)
    engine.classify_texts(texts[:2], tokenizer, batch_size=args.e2e_batch_size)          # warm-up/capture

    def tokenize_only():  # the feeder's own tokenizing threads, with no compute behind them
        source = TextSource(((None, t) for t in texts), tokenizer, cfg, workers=args.workers,
                            lookahead=args.e2e_batch_size + 2)
        layout = ChunkLayout(source, cfg, args.e2e_batch_size, 16, ring=3)
        with Feeder(layout, "cpu") as feed:
            for chunk, _, _ in feed:
                feed.release(chunk)

    t_tok, _ = _timed(tokenize_only, "cpu")
    ids = [tokenize_long(t, tokenizer) for t in texts]
    n_segments = sum(max(1, -(-len(i) // cfg.segment_size)) for i in ids)
    engine.overlap = True
    t_compute, _ = _timed(lambda: engine.classify(ids, batch_size=args.e2e_batch_size), args.device)
    rows = {}
    for overlap in (False, True):
        engine.overlap = overlap
        t, _ = _timed(lambda: engine.classify_texts(texts, tokenizer, batch_size=args.e2e_batch_size,
                                                    workers=args.workers), args.device)
        rows["with_overlap_s" if overlap else "without_overlap_s"] = t
    bound = max(t_tok, t_compute)
    return {"docs": len(texts), "chars_per_doc": args.doc_chars, "tokens": int(sum(len(i) for i in ids)),
            "segments": n_segments, "batch_size": args.e2e_batch_size, "workers": args.workers,
            "tokenize_s": t_tok, "compute_s": t_compute, **rows, "max_tokenize_compute_s": bound,
            "ratio_to_bound": rows["with_overlap_s"] / bound,
            "overlap_speedup": rows["without_overlap_s"] / rows["with_overlap_s"]}


def memory_sweep(model, args) -> list:
    cfg = model.config
    engine = Engine(model, args.device, args.dtype, args.attention)
    engine.classify([torch.randint(1000, cfg.vocab_size, (2 * cfg.segment_size,))])        # warm-up/capture
    rows = []
    for n in args.memory_segments:
        doc = torch.randint(1000, cfg.vocab_size, (n * cfg.segment_size,))
        with PeakMemory(engine.device) as mem:
            t, _ = _timed(lambda: engine.classify([doc]), args.device)
        rows.append({"segments": n, "tokens": n * cfg.segment_size, "seconds": t,
                     "ms_per_segment": 1000 * t / n, "peak_mib": mem.peak / 2**20})
        print(f"  {n:>6} segments: {1000 * t / n:8.2f} ms/segment, peak {mem.peak / 2**20:8.2f} MiB", flush=True)
    return rows


def _stream_one(args, alignment: str) -> dict:
    """In a fresh process (RSS is not shared with earlier runs): one streamed text, one alignment."""
    from rmt_fast.bench import _rss_bytes

    torch.manual_seed(0)
    model = builtin_model(args.layers)
    model.config = model.config.replace(segment_alignment=alignment)
    tokenizer = load_tokenizer(DATA / "bert-base-cased")
    engine = Engine(model, args.device, args.dtype, args.attention)
    engine.classify_texts(["warm up"], tokenizer)
    corpus = " ".join(_texts(8, 200_000, seed=1))

    def pieces():  # a pipe: 1.6M-character pieces until stream_chars have gone by
        sent = 0
        while sent < args.stream_chars:
            yield corpus
            sent += len(corpus)
    rss0 = _rss_bytes()
    with PeakMemory("cpu") as host, PeakMemory(engine.device) as dev:
        t, _ = _timed(lambda: engine.classify_stream([pieces()], tokenizer, workers=args.workers), args.device)
    chars = -(-args.stream_chars // len(corpus)) * len(corpus)
    return {"alignment": alignment, "chars": chars, "seconds": t, "host_peak_mib": host.peak / 2**20,
            "device_peak_mib": dev.peak / 2**20, "rss_start_mib": rss0 / 2**20}


def stream_memory(args) -> list:
    """A long text as a stream of pieces: left alignment streams it, right alignment holds its ids."""
    import multiprocessing

    rows = []
    ctx = multiprocessing.get_context("spawn")
    for alignment in ("left", "right"):
        with ctx.Pool(1) as pool:
            r = pool.apply(_stream_one, (args, alignment))
        rows.append(r)
        print(f"  {alignment:>5}: {r['chars']:,} characters in {r['seconds']:7.2f} s, host RSS peak "
              f"+{r['host_peak_mib']:.1f} MiB" + (f", device peak +{r['device_peak_mib']:.1f} MiB"
                                                 if args.device.startswith("cuda") else ""), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--attention", default="auto")
    p.add_argument("--layers", type=int, default=1, help="encoder layers of the bert-base shape (12: the real one)")
    p.add_argument("--batch-sizes", default="1", help="comma-separated, for the eager/graphed timing")
    p.add_argument("--segments", type=int, default=8, help="segments per document in the eager/graphed timing")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--docs", type=int, default=8, help="texts in the end-to-end run")
    p.add_argument("--doc-chars", type=int, default=4000)
    p.add_argument("--e2e-batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=2, help="tokenizer threads")
    p.add_argument("--memory-segments", default="1,16,64", help="comma-separated lengths in segments")
    p.add_argument("--stream-chars", type=int, default=0, help="characters of the streamed text (0: skip)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: segment,e2e,memory")
    p.add_argument("--out", default="benchmarks/results/driver")
    args = p.parse_args(argv)
    args.memory_segments = [int(s) for s in args.memory_segments.split(",") if s]
    skip = set(filter(None, args.skip.split(",")))
    torch.manual_seed(0)
    model = builtin_model(args.layers)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device)
    meta = {"device": str(dev), "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "dtype": args.dtype, "layers": args.layers, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    result = {"meta": meta}
    print(f"bench_driver on {meta['gpu'] or 'CPU'}, {args.dtype}, bert-base shape with {args.layers} layer(s)")

    if "segment" not in skip:
        print("\n1. per-segment time, eager vs graphed")
        print(f"{'batch':>6} {'eager ms/seg':>13} {'graphed ms/seg':>15} {'speedup':>8}")
        result["per_segment"] = []
        for b in (int(s) for s in args.batch_sizes.split(",")):
            r = per_segment(model, args, b)
            result["per_segment"].append(r)
            g = r.get("graphed_ms_per_segment")
            print(f"{b:>6} {r['eager_ms_per_segment']:>13.3f} {('%.3f' % g) if g else 'n/a (CPU)':>15} "
                  f"{('%.2fx' % r['graph_speedup']) if g else '':>8}", flush=True)
        if dev.type == "cuda":
            print(f"  graphs: {result['per_segment'][-1]['graphed_status']}")

    if "e2e" not in skip:
        print(f"\n2-3. {args.docs} texts of {args.doc_chars} characters: feeder overlap, end to end")
        tokenizer = load_tokenizer(DATA / "bert-base-cased")
        r = end_to_end(model, tokenizer, args, _texts(args.docs, args.doc_chars))
        result["end_to_end"] = r
        print(f"  tokenize alone {r['tokenize_s']:.2f} s, compute alone {r['compute_s']:.2f} s "
              f"({r['segments']} segments)")
        print(f"  end to end: without overlap {r['without_overlap_s']:.2f} s, with overlap "
              f"{r['with_overlap_s']:.2f} s ({r['overlap_speedup']:.2f}x); "
              f"{r['ratio_to_bound']:.2f}x max(tokenize, compute)", flush=True)

    if "memory" not in skip and args.memory_segments:
        print("\n4. peak memory against length (batch 1)")
        rows = memory_sweep(model, args)
        result["memory"] = rows
        flat = rows[-1]["peak_mib"] - rows[0]["peak_mib"]
        print(f"  growth from {rows[0]['segments']} to {rows[-1]['segments']} segments: {flat:+.2f} MiB")
    if args.stream_chars:
        print(f"\n5. one text of {args.stream_chars:,} characters from a stream")
        result["stream"] = stream_memory(args)
    (out / "driver.json").write_text(json.dumps(result, indent=2))
    print(f"\nsaved {out / 'driver.json'}")
    if "memory" in result:
        try:
            plot(result["memory"], out / "driver.png", f"rmt_fast driver, bert-base shape ({args.layers} layers), "
                                                       f"{args.dtype}, {meta['gpu'] or 'CPU'}, batch 1")
            print(f"saved {out / 'driver.png'}")
        except ImportError as e:  # the JSON is what matters; the plot needs matplotlib
            print(f"no plot: {e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
