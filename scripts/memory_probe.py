"""Does a trained model's memory hold Reasoning's bindings? Linear probes on the memory after the facts.

Reasoning (bAbI qa4) gives two facts about one place B ("The A1 is D1 of the B. The A2 is D2 of the B.")
and asks for the place in one direction. A three-task model answered it at one segment but at chance
between A1 and A2 once both facts were in an earlier segment (docs/TRAINING.md). This splits that into
"the memory does not hold which direction goes with which place" (write) and "it holds it but the
question cannot read it" (read).

For Reasoning samples of 2 segments whose facts both lie in the first segment, the
Engine reads the first segment alone (float32) and keeps the memory [M, H]. Then, on the flattened memory:
  places:  one logistic probe per place: is it one of the two facts' places (A1 or A2)? (balanced accuracy)
  binding: one 6-way probe per direction D, fit on the samples where D is a fact's direction: which place
           is D of B? A memory holding the two places but not the pairing sits near 50% (a coin between
           A1 and A2); one holding the pairing near 100%.
Probes are fit on one set of samples (train split) and scored on another (validation split), beside the
model's own answers on those samples (both segments), by question form.
    python scripts/memory_probe.py /work/runs/m6d/stages/12/best --train 3000 --test 600
    python scripts/memory_probe.py MODEL --features mean     # the tokens' mean (order-free); also max, each
(--features each fits the probes on every memory token alone and prints the three best tokens' binding.)
"""
from __future__ import annotations

import argparse
import re

import torch
import torch.nn.functional as F

from rmt_fast import Engine, RMTForSequenceClassification
from rmt_fast import tasks as T

FACT = re.compile(r"The (\w+) is (\w+) of the (\w+)\.")


def memories(model, tokenizer, n: int, seed: int, split: str, answers: bool = False):
    """(memory [n, M*H] float32, places [n, 2], directions [n, 2]) of n samples with both facts in segment 1;
    with answers, also each sample's (model's label on the whole sample == its label, question form)."""
    gen = T.TaskGenerator("reasoning", tokenizer, model.config, split=split, seed=seed)
    S = model.config.segment_size
    docs, places, dirs, kept, i = [], [], [], [], 0
    while len(docs) < n:
        s = gen.sample(2, i)
        i += 1
        if max(end for _, end in s.fact_spans) > S:
            continue
        pairs = [FACT.fullmatch(f).groups() for f in s.facts]
        docs.append(s.input_ids[:S])
        kept.append(s)
        places.append([T.PLACES.index(a) for a, _, _ in pairs])
        dirs.append([T.DIRECTIONS.index(d) for _, d, _ in pairs])
    states = Engine(model, dtype="float32").read_many(docs, batch_size=64)
    mem = torch.stack([st.memory.float().flatten() for st in states])                # [n, M*H]
    if not answers:
        return mem, torch.tensor(places), torch.tensor(dirs)
    logits = Engine(model, dtype="float32").classify([s.input_ids for s in kept], batch_size=64)
    right = logits.argmax(1) == torch.tensor([s.label for s in kept])
    forms = ["opposite" if s.question.startswith("What is the") else "direct" for s in kept]
    return mem, torch.tensor(places), torch.tensor(dirs), right, forms


def fit(x, y, classes: int, steps: int = 300, wd: float = 1e-3):
    """A logistic probe (full-batch L-BFGS, L2 weight wd): returns predict(x) -> labels."""
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + wd * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda z: (z @ w + b).argmax(1)


def bound_place(dirs, places, d: int):
    """(keep [n] bool: samples with a fact in direction d, [kept] the place that is d of B in each)."""
    has = dirs == d                                                                  # [n, 2]
    keep = has.any(1)
    return keep, places[keep][has[keep]]


def probes(xtr, ptr, dtr, xte, pte, dte) -> dict:
    """Fit on (x [n, F], places [n, 2], directions [n, 2]) and score on the test set: {"places": [balanced
    accuracy per place], "binding": [(accuracy, test samples) per direction]}. Features are standardized
    with the fitting set's mean and spread."""
    mu, sd = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    places = []
    for k in range(len(T.PLACES)):
        ytr, yte = (ptr == k).any(1).long(), (pte == k).any(1).long()
        pred = fit(xtr, ytr, 2)(xte)
        places.append(0.5 * sum(((pred == c) & (yte == c)).sum().item() / max(1, (yte == c).sum().item())
                                for c in (0, 1)))
    binding = []
    for d in range(len(T.DIRECTIONS)):
        ktr, ytr = bound_place(dtr, ptr, d)
        kte, yte = bound_place(dte, pte, d)
        pred = fit(xtr[ktr], ytr, len(T.PLACES))(xte[kte])
        binding.append(((pred == yte).float().mean().item(), int(kte.sum())))
    return {"places": places, "binding": binding}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a saved RMT model folder (e.g. a training run's stages/N/best)")
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--test", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--features", choices=("concat", "mean", "max", "each"), default="concat",
                   help="the probes' input: all memory tokens side by side, their mean, their max, or each alone")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    model = RMTForSequenceClassification.from_pretrained(args.model)
    tokenizer = T.load_tokenizer(args.model)
    xtr, ptr, dtr = memories(model, tokenizer, args.train, args.seed, "train")
    xte, pte, dte, right, forms = memories(model, tokenizer, args.test, args.seed + 1, "validation", answers=True)
    M = model.config.num_mem_tokens
    H = xtr.shape[1] // M
    print(f"{args.model}: memory {M} x {H}, {len(xtr)} probe-training / {len(xte)} test samples, "
          f"features: {args.features}")
    if args.features == "each":
        scores = []
        for m in range(M):
            r = probes(xtr.view(-1, M, H)[:, m], ptr, dtr, xte.view(-1, M, H)[:, m], pte, dte)
            scores.append((sum(a for a, _ in r["binding"]) / len(r["binding"]), m))
        print("binding from one memory token alone (mean over directions), the best three: "
              + ", ".join(f"token {m} {a:.0%}" for a, m in sorted(scores)[::-1][:3]))
        return 0
    pool = {"concat": lambda x: x, "mean": lambda x: x.view(-1, M, H).mean(1),
            "max": lambda x: x.view(-1, M, H).amax(1)}[args.features]
    r = probes(pool(xtr), ptr, dtr, pool(xte), pte, dte)
    print("places (is P one of the two facts' places; balanced accuracy, chance 50%): "
          + ", ".join(f"{n} {a:.0%}" for n, a in zip(T.PLACES, r["places"])))
    print("binding (which place is D of B; 50% = a coin between the two places): "
          + ", ".join(f"{n} {a:.0%} ({m})" for n, (a, m) in zip(T.DIRECTIONS, r["binding"])))
    by_form = {f: right[[g == f for g in forms]] for f in ("direct", "opposite")}
    print("the model's own answers on the same test samples (both segments): "
          + ", ".join(f"{f} question {v.float().mean():.0%} ({len(v)})" for f, v in by_form.items())
          + f"; all {right.float().mean():.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
