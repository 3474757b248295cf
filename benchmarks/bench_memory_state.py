"""Read once, ask many vs classify from scratch (docs/PERF.md, "Memory states").

bert-base-cased shape (hidden 768, 12 heads, FFN 3072) with --layers encoder layers, random weights,
M = 10, --input-size positions, left alignment. Reads a document of --segments full segments once and
asks --questions questions of one segment each; classifies --scratch of the (document + question)
pairs from scratch (batch_size=1 each, as one would without a state) and scales to all the questions.
One run, one process: the machine is shared, so the figures compare within this run only.
"""
import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import bert_base_cased_config, make_model  # noqa: E402

from rmt_fast import Engine  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--input-size", type=int, default=128)
    p.add_argument("--segments", type=int, default=256)
    p.add_argument("--questions", type=int, default=10)
    p.add_argument("--scratch", type=int, default=1)
    args = p.parse_args()
    torch.manual_seed(0)
    model = make_model(bert_base_cased_config(args.layers), num_mem_tokens=10, input_size=args.input_size,
                       segment_alignment="left")
    engine = Engine(model)
    S, V = model.config.segment_size, model.config.vocab_size
    doc = torch.randint(1000, V, (args.segments * S,))
    questions = [torch.randint(1000, V, (S - 5,)) for _ in range(args.questions)]
    engine.classify([doc[:S]])                          # warm-up (kernels, packing)
    t0 = time.perf_counter()
    state = engine.read(doc)
    t_read = time.perf_counter() - t0
    t0 = time.perf_counter()
    asked = engine.ask(state, questions, batch_size=args.questions)
    t_ask = time.perf_counter() - t0
    t0 = time.perf_counter()
    scratch = torch.cat([engine.classify([torch.cat([doc, q])], batch_size=1) for q in questions[:args.scratch]])
    t_scratch = (time.perf_counter() - t0) / args.scratch
    diff = float((asked[:args.scratch] - scratch).abs().max())
    print(f"cpu: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})")
    print(f"model: bert-base shape, {args.layers} layers, input_size {args.input_size} (S = {S}), M = 10, float32")
    print(f"read {args.segments} segments once: {t_read:.2f} s ({args.segments / t_read:.1f} seg/s)")
    print(f"ask {args.questions} questions (one segment each, side by side): {t_ask:.2f} s "
          f"({t_ask / args.questions * 1000:.0f} ms per question)")
    print(f"classify one (document + question) from scratch: {t_scratch:.2f} s; x{args.questions} = "
          f"{t_scratch * args.questions:.1f} s (measured {args.scratch}, scaled)")
    print(f"read once + ask {args.questions}: {t_read + t_ask:.2f} s vs {t_scratch * args.questions:.1f} s: "
          f"{t_scratch * args.questions / (t_read + t_ask):.1f}x less time")
    print(f"max |ask - classify| over the pairs classified: {diff:.2e}")


if __name__ == "__main__":
    main()
