"""Eval throughput of the compat class against the plain PyTorch path, float32 and under autocast bf16, one run.

  (a) plain path, float32: ``RMTForSequenceClassification.forward`` under ``no_grad`` (what the compat
      class falls back to, and the reference's own way: eager HF BERT per segment);
  (b) plain path under ``torch.autocast(dtype=bfloat16)`` (the reference's Trainer with mixed precision);
  (c) compat class, float32 weights: the Engine in float32;
  (d) compat class under ``torch.autocast(dtype=bfloat16)``: the Engine in bfloat16.
Each is timed once over the same batch (after a one-segment warm-up that also builds the Engine, whose
build time is reported apart), called as a reference script calls it: ``model(input_ids, attention_mask)``.

bert-base-cased shape (hidden 768, 12 heads) with ``--layers`` layers, random weights, M = 10,
``--docs`` documents of ``--segments`` full segments each (499 text tokens per segment).

  python benchmarks/bench_compat.py [--layers 2] [--docs 4] [--segments 8] [--device cpu] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import BertConfig, BertForSequenceClassification

from rmt_fast.bench import DATA
from rmt_fast.compat import RMTEncoderForSequenceClassification
from rmt_fast.model import RMTForSequenceClassification

TOKENIZER = SimpleNamespace(cls_token_id=101, sep_token_id=102, pad_token_id=0)


def compat_model(layers: int, segments: int, device) -> RMTEncoderForSequenceClassification:
    bconf = BertConfig.from_json_file(str(DATA / "bert-base-cased" / "config.json"))
    bconf.num_hidden_layers, bconf.num_labels = layers, 6
    backbone = BertForSequenceClassification(bconf)
    backbone.set_attn_implementation("eager")   # the reference's attention
    return RMTEncoderForSequenceClassification(backbone, num_mem_tokens=10, tokenizer=TOKENIZER, input_size=512,
                                               max_n_segments=segments).to(device).eval()


def tokenized(docs: int, tokens: int, vocab: int):
    """[docs, tokens + 2] ids as a tokenizer gives them ([CLS] text [SEP]) and the attention mask."""
    text = torch.randint(1000, vocab, (docs, tokens))
    ids = torch.cat([torch.full((docs, 1), 101), text, torch.full((docs, 1), 102)], dim=1)
    return ids, torch.ones_like(ids)


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--docs", type=int, default=4)
    p.add_argument("--segments", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = compat_model(args.layers, args.segments, device)
    S = model.config.segment_size
    ids, mask = (t.to(device) for t in tokenized(args.docs, args.segments * S, model.config.vocab_size))
    warm_ids, warm_mask = ids[:, :S + 2], mask[:, :S + 2]
    n_seg = args.docs * args.segments
    plain = lambda: RMTForSequenceClassification.forward(model, ids).logits   # noqa: E731
    compat = lambda: model(ids, mask).logits                                  # noqa: E731
    rows, logits = {}, {}
    for name, fn, autocast in [("plain float32", plain, False), ("plain autocast bf16", plain, True),
                               ("compat float32", compat, False), ("compat autocast bf16", compat, True)]:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            model.train().eval()   # drop any cached Engine: the warm-up below builds it
            build, _ = timed(lambda: model(warm_ids, warm_mask) if fn is compat else
                             RMTForSequenceClassification.forward(model, warm_ids), device)
            seconds, logits[name] = timed(fn, device)
        rows[name] = {"s": seconds, "ms_per_segment": 1e3 * seconds / n_seg, "segments_per_s": n_seg / seconds,
                      "warmup_s": build, "engine": None if model._engine is None else str(model._engine.dtype)}
        print(f"{name:24s} {rows[name]['ms_per_segment']:8.1f} ms/segment  ({seconds:.1f} s; warm-up "
              f"{build:.1f} s)", flush=True)
    ref = logits["plain float32"].double()
    for name in rows:
        rows[name]["max_abs_logit_diff_vs_plain_float32"] = (logits[name].double() - ref).abs().max().item()
    base, base_bf16 = rows["plain float32"]["s"], rows["plain autocast bf16"]["s"]
    ratios = {"compat float32 / plain float32": base / rows["compat float32"]["s"],
              "compat autocast bf16 / plain float32": base / rows["compat autocast bf16"]["s"],
              "compat autocast bf16 / plain autocast bf16": base_bf16 / rows["compat autocast bf16"]["s"]}
    print("\n| case | ms per segment | max abs logit diff vs plain float32 |\n|---|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['ms_per_segment']:.1f} | {r['max_abs_logit_diff_vs_plain_float32']:.2e} |")
    print("\n| speed-up | x |\n|---|---:|")
    for name, x in ratios.items():
        print(f"| {name} | {x:.2f} |")
    if args.out:
        meta = {"layers": args.layers, "docs": args.docs, "segments": args.segments, "device": str(device),
                "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor()
                or platform.machine(), "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
