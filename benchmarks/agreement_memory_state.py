"""The shipped default model: ask(read(document), [question]) against classify(document + question)
on the report's tasks (docs/PERF.md, "Memory states").

The model is right-aligned. A task sample is n_segments * S tokens, so its cuts coincide with a
reader's full segments and ask must equal classify; with the first r tokens (r uniform in 1..S-1)
dropped, classify puts a partial segment first and ask puts it last: that is the difference measured.
"""
import argparse
import random
import time

import torch

from rmt_fast import Engine, RMTForSequenceClassification
from rmt_fast.cli_args import default_model_dir
from rmt_fast.tasks import TaskGenerator
from rmt_fast.tokenize import load_tokenizer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", nargs="+", default=["detect"])
    p.add_argument("--segments", nargs="+", type=int, default=[16, 256])
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--trimmed-only", action="store_true", help="skip the as-generated samples (equal by construction)")
    args = p.parse_args()
    path = default_model_dir()
    model = RMTForSequenceClassification.from_pretrained(path)
    tok = load_tokenizer(path)
    engine, S = Engine(model), model.config.segment_size
    rng = random.Random(0)
    for task in args.tasks:
        gen = TaskGenerator(task, tok, model.config, split="test", seed=0)
        for n in args.segments:
            t0 = time.perf_counter()
            samples = gen.samples(n, range(args.samples))
            labels = torch.tensor([s.label for s in samples])
            for trim in ((True,) if args.trimmed_only else (False, True)):
                docs, questions = [], []
                for s in samples:
                    a, b = s.question_span
                    r = rng.randrange(1, S) if trim else 0
                    docs.append(s.input_ids[r:a])
                    questions.append(s.input_ids[a:b])
                whole = engine.classify([torch.cat([d, q]) for d, q in zip(docs, questions)],
                                        batch_size=args.batch_size)
                states = engine.read_many(docs, batch_size=args.batch_size)
                asked = torch.cat([engine.ask(st, [q]) for st, q in zip(states, questions)])
                pa, pc = asked.softmax(-1), whole.softmax(-1)
                agree = float((pa.argmax(-1) == pc.argmax(-1)).float().mean())
                print(f"{task} {n} segments {'head trimmed' if trim else 'as generated'}: agreement "
                      f"{agree:.1%} over {len(docs)}; accuracy ask {float((pa.argmax(-1) == labels).float().mean()):.1%}"
                      f" classify {float((pc.argmax(-1) == labels).float().mean()):.1%}; max |dp| "
                      f"{float((pa - pc).abs().max()):.3g}, max |dlogit| {float((asked - whole).abs().max()):.3g}",
                      flush=True)
            print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
