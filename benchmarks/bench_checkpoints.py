"""What resumable runs cost: classify with and without checkpoint_dir, side by side (docs/PERF.md,
"Resuming a long run (issue 14)").

Runs the same documents through the Engine without checkpoints and with checkpoint_every=--every,
interleaved in one process (off, on, then on, off, ...: the order alternates so drifting load falls on
both), and reports the median wall time and the median CPU time of the process (every thread, the
checkpoint writer's included) of each, the overhead, and the load average beside it. On a shared
machine the CPU time is the steadier figure: wall time moves with other processes. Run it with
OMP_NUM_THREADS=1 (the figure is per core). --model bert-base: bert-base-cased's shape (hidden 768,
FFN 3072) with --layers layers, random weights, M = 10, --input-size positions; --model default: the
shipped default model (hidden 128, 2 layers, 64 positions).
"""
import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import bert_base_cased_config, make_model  # noqa: E402

from rmt_fast import Engine, RMTForSequenceClassification  # noqa: E402
from rmt_fast.cli_args import default_model_dir  # noqa: E402


def build(args):
    if args.model == "default":
        return RMTForSequenceClassification.load(default_model_dir())
    return make_model(bert_base_cased_config(args.layers), num_mem_tokens=10, input_size=args.input_size)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["bert-base", "default"], default="bert-base")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--input-size", type=int, default=128)
    p.add_argument("--docs", type=int, default=2)
    p.add_argument("--segments", type=int, default=512, help="segments per document")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--every", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dtype", default="auto")
    args = p.parse_args()
    torch.manual_seed(0)
    model = build(args)
    engine = Engine(model, dtype=args.dtype)
    S, V = model.config.segment_size, model.config.vocab_size
    docs = [torch.randint(1000, V, (args.segments * S,)) for _ in range(args.docs)]
    engine.classify([d[:S] for d in docs], batch_size=args.batch_size)          # warm-up (packing, kernels)
    # Once per Engine (per plan): the model's fingerprint, a sha256 of every weight, which each file holds.
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        engine.classify([d[:S] for d in docs], batch_size=args.batch_size, checkpoint_dir=tmp)
    t_fingerprint = time.perf_counter() - t0
    times = {"off": [], "on": []}
    cpu = {"off": [], "on": []}
    loads, written = [], []
    want = engine.classify(docs, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
                kw = {} if mode == "off" else dict(checkpoint_dir=Path(tmp) / f"ck{r}", checkpoint_every=args.every)
                report = {}
                c0, t0 = time.process_time(), time.perf_counter()
                out = engine.classify(docs, batch_size=args.batch_size, checkpoint_report=report, **kw)
                times[mode].append(time.perf_counter() - t0)
                cpu[mode].append(time.process_time() - c0)
                loads.append(os.getloadavg()[0])
                assert torch.equal(out, want)
                if mode == "on":
                    written.append(report["checkpoints_written"])
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    cpu_off, cpu_on = statistics.median(cpu["off"]), statistics.median(cpu["on"])
    n_seg = args.docs * args.segments
    saves = args.docs * ((args.segments - 1) // args.every + 1)     # memories, then logits
    print(f"cpu: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}, load average during the runs {min(loads):.1f}-{max(loads):.1f} "
          f"({os.cpu_count()} cores)")
    print(f"model: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters), "
          f"dtype {str(engine.dtype).replace('torch.', '')}, S = {S}, {args.docs} documents x {args.segments} "
          f"segments, batch {args.batch_size}, checkpoint_every {args.every} ({saves} saves per run; written "
          f"before the call returned: {min(written)}-{max(written)}, the rest dropped as the folder goes)")
    print(f"without checkpoints: wall median {off:.3f} s ({', '.join(f'{t:.3f}' for t in times['off'])}); "
          f"CPU median {cpu_off:.3f} s; {1e3 * off / n_seg * args.batch_size:.2f} ms per step")
    print(f"with checkpoints:    wall median {on:.3f} s ({', '.join(f'{t:.3f}' for t in times['on'])}); "
          f"CPU median {cpu_on:.3f} s")
    print(f"once per Engine, before the first checkpointed call: the model fingerprint, {t_fingerprint:.3f} s")
    print(f"overhead (median against median): wall {100 * (on - off) / off:+.2f}%, CPU {100 * (cpu_on - cpu_off) / cpu_off:+.2f}%")


if __name__ == "__main__":
    main()
