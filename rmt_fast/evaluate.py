"""Accuracy against input length (``rmt-fast evaluate``), like the report's Figures 1 and 5.

For each model and each length 1, 2, 4, ... segments, classify ``samples`` test documents of the task
through the fast Engine and count the correct answers. Under ``torchrun`` every process takes every
world-th sample (sample i is the same document on every process, see ``rmt_fast.tasks``) and the
counts are summed across processes, so the numbers do not depend on the process count.

Writes ``<out>/accuracy.json``, ``<out>/accuracy.md`` (the table) and ``<out>/accuracy.png``
(accuracy against input length in tokens, log x axis, one line per model).

``--run TRAIN_DIR`` (Figure 5) evaluates every curriculum stage's best model of a training run at
lengths up to ``--max-factor`` times the longest training length and draws the grid instead: training
segments against evaluation length, accuracy as colour, one panel per task (``heatmap.png``).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, asdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import distributed, files, plotting
from . import tasks as T
from .cli_args import (check_output_dir, default_model_dir, dtype_name, nonnegative_int, positive_int,
                       positive_int_list, run_command)


def predict(model, docs, batch_size: int = 8, device="cpu", progress: bool = False, engine=None) -> torch.Tensor:
    """Logits [len(docs), num_labels] through the Engine (the fast inference path).

    engine: an ``Engine`` of ``model`` to reuse (its weights are packed once); else one is built.
    """
    if len(docs) == 0:
        return torch.zeros(0, model.config.num_labels)
    if engine is None:
        from .engine import Engine

        engine = Engine(model, device=device, dtype="float32")   # accuracy is reported in float32
    return engine.classify(docs, batch_size=batch_size, progress=progress)


def default_lengths(max_segments: int) -> List[int]:
    """1, 2, 4, ... up to max_segments (max_segments itself included)."""
    out, n = [], 1
    while n < max_segments:
        out.append(n)
        n *= 2
    out.append(max_segments)
    return out


def samples_at(n_segments: int, samples: int, long_samples: Optional[int], long_from: int) -> int:
    """Samples to draw at a length: ``samples``, or ``long_samples`` from ``long_from`` segments on."""
    if long_samples is not None and n_segments >= long_from:
        return long_samples
    return samples


def _binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space (n up to many thousands)."""
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 1.0 if k >= n else 0.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
             for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def clopper_pearson(correct: int, samples: int, level: float = 0.95) -> Tuple[float, float]:
    """The exact (Clopper-Pearson) two-sided interval of a binomial proportion, by bisection."""
    if samples <= 0:
        return float("nan"), float("nan")
    alpha = (1.0 - level) / 2

    def solve(f) -> float:                       # f increasing in p: the p with f(p) = 0
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
        return (lo + hi) / 2

    # low: P(X >= correct | p) = alpha; high: P(X <= correct | p) = alpha (both sides increasing in p).
    low = 0.0 if correct == 0 else solve(lambda p: (1 - _binomial_cdf(correct - 1, samples, p)) - alpha)
    high = 1.0 if correct == samples else solve(lambda p: alpha - _binomial_cdf(correct, samples, p))
    return low, high


@dataclass
class Row:
    model: str
    task: str
    n_segments: int
    n_tokens: int        # text tokens of each document (n_segments * segment_size)
    samples: int
    correct: int
    accuracy: float
    seconds: float
    ci_low: float = float("nan")     # 95% Clopper-Pearson interval of the accuracy
    ci_high: float = float("nan")
    predicted: Optional[List[int]] = None   # the predicted label of sample 0, 1, ... (to compare runs)

    def __post_init__(self):
        if math.isnan(self.ci_low) and self.samples:
            self.ci_low, self.ci_high = clopper_pearson(self.correct, self.samples)


def evaluate_model(model, tokenizer, task: str, lengths: Sequence[int], samples: int, name: str = "model",
                   long_samples: Optional[int] = None, long_from: int = 1 << 30, batch_size: int = 32,
                   seed: int = 1234, split: str = "test", device="cpu", progress: bool = False,
                   engine=None) -> List[Row]:
    """Accuracy of one model on one task at each length, sharded across torchrun processes.

    engine: an ``Engine`` of ``model`` to classify with; by default one is built for the whole call.
    """
    from .engine import Engine

    rank, world = distributed.rank_and_world()
    engine = engine if engine is not None else Engine(model, device=device, dtype="float32")
    gen = T.TaskGenerator(task, tokenizer, model.config, split=split, seed=seed)
    rows = []
    for n in lengths:
        k = samples_at(n, samples, long_samples, long_from)
        t0 = time.time()
        correct = 0
        mine = list(range(rank, k, world))
        predicted = [0.0] * k            # label + 1 at this rank's samples, 0 elsewhere: summed over ranks
        # Generate and classify in chunks so that very long documents do not all sit in memory at once.
        chunk = max(batch_size, 1)
        for c in range(0, len(mine), chunk):
            docs, labels = gen.batch(n, mine[c:c + chunk])
            logits = predict(model, docs, batch_size=batch_size, engine=engine,
                             progress=progress and rank == 0 and n * len(docs) >= 4096)
            chosen = logits.argmax(-1)
            correct += int((chosen == labels).sum())
            for i, label in zip(mine[c:c + chunk], chosen.tolist()):
                predicted[i] = label + 1.0
        c, total = (int(x) for x in distributed.all_reduce([correct, len(mine)], device))
        predicted = [int(x) - 1 for x in distributed.all_reduce(predicted, device)]
        seconds = distributed.all_reduce([time.time() - t0], device, op="max")[0]
        rows.append(Row(model=name, task=T.TASK_ALIASES[task], n_segments=n,
                        n_tokens=n * model.config.segment_size, samples=total, correct=c,
                        accuracy=c / total if total else float("nan"), seconds=round(float(seconds), 3),
                        predicted=predicted))
        if rank == 0 and progress:
            r = rows[-1]
            print(f"{name} {r.task} {n} seg ({r.n_tokens} tokens): {r.accuracy:.3f} ({c}/{total}) in {r.seconds:.1f}s",
                  flush=True)
    return rows


def table(rows: Sequence[Row]) -> str:
    lines = ["| model | task | segments | tokens | samples | accuracy | 95% interval | seconds |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.model} | {r.task} | {r.n_segments} | {r.n_tokens:,} | {r.samples} | "
                     f"{100 * r.accuracy:.1f}% | {100 * r.ci_low:.1f}-{100 * r.ci_high:.1f}% | {r.seconds:.1f} |")
    return "\n".join(lines)


def plot(rows: Sequence[Row], path) -> None:
    """Accuracy against input length in tokens, log x axis, one line per (model, task), its 95% interval shaded."""
    plt = plotting.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    keys = list(dict.fromkeys((r.model, r.task) for r in rows))
    for model, task in keys:
        rs = sorted((r for r in rows if (r.model, r.task) == (model, task)), key=lambda r: r.n_tokens)
        x = [r.n_tokens for r in rs]
        line, = ax.plot(x, [100 * r.accuracy for r in rs], marker="o",
                        label=f"{model} / {task}" if len({k[1] for k in keys}) > 1 or len(keys) > 1 else model)
        ax.fill_between(x, [100 * r.ci_low for r in rs], [100 * r.ci_high for r in rs], color=line.get_color(),
                        alpha=0.15, linewidth=0)
    ax.set_xscale("log")
    ax.set_xlabel("input length, text tokens (log scale)")
    ax.set_ylabel("accuracy, %")
    ax.set_ylim(0, 102)
    ax.axhline(100 / len(T.LABEL_NAMES), color="grey", linestyle=":", linewidth=1, label="chance")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    plotting.savefig(fig, path, dpi=120)


def write_outputs(rows: Sequence[Row], out_dir, meta: Optional[dict] = None, with_plot: bool = True,
                  grid: Optional[Dict[str, dict]] = None) -> Dict[str, Path]:
    """accuracy.json, accuracy.md and (with_plot) accuracy.png in out_dir, each written atomically.

    With ``grid`` (from ``grids``: the Figure 5 layout) the JSON holds it too, the table has the grid
    tables after the rows, and the plot is ``heatmap.png`` (a panel per task) instead of accuracy.png.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "accuracy.json", "table": out / "accuracy.md"}
    data = {"meta": meta or {}, "rows": [asdict(r) for r in rows]}
    text = table(rows) + "\n"
    if grid is not None:
        data["grid"] = grid
        text = grid_table(grid) + "\n\n" + text
    files.write_text(paths["json"], json.dumps(data, indent=2))
    files.write_text(paths["table"], text)
    if with_plot and grid is not None:
        paths["plot"] = out / "heatmap.png"
        plotting.heatmaps(grid, paths["plot"])
    elif with_plot:
        paths["plot"] = out / "accuracy.png"
        plot(rows, paths["plot"])
    return paths


def stage_models(runs: Sequence) -> List[tuple]:
    """(training segments n, folder) of every curriculum stage's best model in the training runs
    (``<run>/stages/<n>/best``), sorted by n. A stage found in two runs is an error naming both."""
    found: Dict[int, Path] = {}
    for run in map(Path, runs):
        if not run.is_dir():
            raise ValueError(f"--run {run}: not a folder")
        stages = sorted((d for d in (run / "stages").glob("*") if d.name.isdigit() and (d / "best").is_dir()),
                        key=lambda d: int(d.name))
        if not stages:
            raise ValueError(f"--run {run}: no stages/<n>/best/ model in it (is it an rmt-fast train folder?)")
        for d in stages:
            n = int(d.name)
            if n in found:
                raise ValueError(f"--run: stage {n} is in both {found[n].parent.parent.parent} and {run}")
            found[n] = d / "best"
    return sorted(found.items())


def grid_lengths(longest_training: int, factor: int = 4) -> List[int]:
    """Evaluation lengths of the grid: 1, 2, 4, ... and the longest training length times 1, 2, ..., factor."""
    top = factor * longest_training
    return sorted(set(default_lengths(top)) | {k * longest_training for k in range(1, factor + 1)})


def grids(rows: Sequence[Row], stages: Dict[str, int]) -> Dict[str, dict]:
    """Per task: training segments (rows), evaluation segments (columns), accuracy [train][eval] (None: not run)."""
    out = {}
    for task in dict.fromkeys(r.task for r in rows):
        rs = [r for r in rows if r.task == task and r.model in stages]
        train = sorted({stages[r.model] for r in rs})
        evals = sorted({r.n_segments for r in rs})
        acc = [[None] * len(evals) for _ in train]
        for r in rs:
            acc[train.index(stages[r.model])][evals.index(r.n_segments)] = r.accuracy
        out[task] = {"train_segments": train, "eval_segments": evals, "accuracy": acc}
    return out


def grid_table(grid: Dict[str, dict]) -> str:
    """One markdown table per task: a row per training length, a column per evaluation length."""
    parts = []
    for task, g in grid.items():
        lines = [f"**{task}** (rows: trained on n segments; columns: evaluated at n segments)", "",
                 "| trained on | " + " | ".join(str(e) for e in g["eval_segments"]) + " |",
                 "|---:|" + "---:|" * len(g["eval_segments"])]
        for t, accs in zip(g["train_segments"], g["accuracy"]):
            cells = ["–" if a is None else f"{100 * a:.0f}%" for a in accs]
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


# -- CLI ------------------------------------------------------------------------------------------

def add_cli(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("evaluate", help="accuracy against input length on a synthetic task",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", help="rmt_fast model directories; NAME=DIR labels a line "
                                             "(default: the shipped default model)")
    # --train-run: under torchrun, whose parser takes "--run" for its own --run-path before the module's flags.
    p.add_argument("--run", "--train-run", dest="run", action="append", default=None, metavar="TRAIN_DIR",
                   help="a training run's folder: evaluate every curriculum stage's best model (stages/<n>/best) "
                        "and draw the grid (heatmap.png, Figure 5); repeat for a curriculum over several runs "
                        "(--train-run under torchrun)")
    p.add_argument("--max-factor", type=positive_int, default=4,
                   help="with --run: evaluate up to this many times the longest training length")
    p.add_argument("--task", action="append", default=None, choices=list(T.TASK_ALIASES),
                   help="memorize, detect or reasoning; repeat for several (default: memorize and detect)")
    p.add_argument("--max-segments", type=positive_int, default=4096, help="lengths 1, 2, 4, ... up to this")
    p.add_argument("--lengths", type=positive_int_list, default=None,
                   help="comma-separated segment counts instead of powers of two")
    p.add_argument("--samples", type=positive_int, default=100, help="samples per length")
    p.add_argument("--long-samples", type=positive_int, default=None, help="samples per length from --long-from on")
    p.add_argument("--long-from", type=positive_int, default=1024)
    p.add_argument("--batch-size", type=positive_int, default=32, help="documents side by side in the Engine")
    p.add_argument("--seed", type=nonnegative_int, default=1234)
    p.add_argument("--split", default="test", choices=list(T.SPLITS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", type=dtype_name, default="float32",
                   help="the Engine's compute dtype (accuracy is reported in float32 by default; bfloat16 to "
                        "compare: each row's JSON lists every sample's predicted label)")
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--out", default="eval-results", help="output directory for accuracy.{json,md,png}")
    p.add_argument("--no-plot", action="store_true", help="skip accuracy.png (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
    return p


def _model_specs(specs: Sequence[str]) -> List[tuple]:
    """(name, path) of each ``[NAME=]DIR`` argument."""
    models = []
    for spec in specs:
        name, _, path = spec.rpartition("=") if "=" in spec else (None, None, spec)
        models.append((name or Path(path).name, Path(path)))
    return models


def run(args) -> int:
    from .engine import Engine
    from .model import RMTForSequenceClassification

    if args.threads:
        torch.set_num_threads(args.threads)
    created = distributed.init_process_group(args.device)
    rank, world = distributed.rank_and_world()
    try:
        # Every output and input problem shows now, not after hours of compute.
        if rank == 0:
            check_output_dir(args.out, "--out")
            if not args.no_plot:
                plotting.require_matplotlib()
        stages: Dict[str, int] = {}
        if args.run:
            if args.models:
                raise ValueError("give either model folders or --run, not both")
            found = stage_models(args.run)
            stages = {f"stage {n}": n for n, _ in found}
            models = [(f"stage {n}", path) for n, path in found]
            lengths = args.lengths or grid_lengths(found[-1][0], args.max_factor)
        else:
            models = _model_specs(args.models or [f"default={default_model_dir()}"])
            lengths = args.lengths or default_lengths(args.max_segments)
        task_names = args.task or ["memorize", "detect"]
        rows: List[Row] = []
        t0 = time.time()
        # Every model loads before any is evaluated: a bad one fails the run before compute, not after.
        loaded = [(name, RMTForSequenceClassification.from_pretrained(path), T.load_tokenizer(path))
                  for name, path in models]
        for name, model, tokenizer in loaded:
            engine = Engine(model, device=args.device, dtype=args.dtype)  # one per model
            for task in task_names:
                rows += evaluate_model(model, tokenizer, task, lengths, args.samples, name=name,
                                       long_samples=args.long_samples, long_from=args.long_from,
                                       batch_size=args.batch_size, seed=args.seed, split=args.split,
                                       device=args.device, progress=not args.no_progress, engine=engine)
        if rank == 0:
            meta = {"models": {n: str(p) for n, p in models}, "tasks": task_names, "split": args.split,
                    "seed": args.seed, "dtype": args.dtype, "processes": world, "wall_s": round(time.time() - t0, 1),
                    "torch_threads": torch.get_num_threads(), "runs": [str(r) for r in args.run or []]}
            try:
                print(table(rows), flush=True)  # first: the results survive a failing write
                if stages:
                    print(grid_table(grids(rows, stages)), flush=True)
            finally:
                paths = write_outputs(rows, args.out, meta, with_plot=not args.no_plot,
                                      grid=grids(rows, stages) if stages else None)
            print("wrote " + ", ".join(str(p) for p in paths.values()) + f" in {meta['wall_s']} s")
    finally:
        distributed.destroy_process_group(created)
    return 0


def main(argv=None) -> int:
    import sys

    parser = argparse.ArgumentParser(prog="rmt-fast")
    sub = parser.add_subparsers(required=True)
    add_cli(sub)
    args = parser.parse_args(["evaluate"] + list(sys.argv[1:] if argv is None else argv))
    return run_command(args)


if __name__ == "__main__":
    raise SystemExit(main())
