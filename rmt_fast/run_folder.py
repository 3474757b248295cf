"""The folder of a training run: checkpoints swapped in crash-safely, the flags a resume must keep,
and ``metrics.jsonl`` read back with each step counted once."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import List, Optional

import torch

from . import files

# Flags that cannot change what a run computes: the only ones a resumed run may change.
RESUMABLE_CHANGES = ("out_dir", "threads", "progress", "stop_after")


def flag(field: str) -> str:
    """The command-line flag of a TrainConfig field."""
    return "--no-progress" if field == "progress" else "--" + field.replace("_", "-")


def check_same_run(saved: dict, cfg, source) -> None:
    """Refuse to resume with a flag that changes the run: name the flag, its old and its new value.

    saved: the run's ``train_config.json``; cfg: the new ``TrainConfig``.
    """
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples as lists, as in the saved file
    for name, value in now.items():
        if name in RESUMABLE_CHANGES or saved.get(name, value) == value:
            continue
        allowed = ", ".join(flag(f) for f in RESUMABLE_CHANGES[1:])
        raise ValueError(f"--resume: {flag(name)} changed from {saved[name]!r} to {value!r} since the run "
                         f"started ({source}); a resumed run keeps its flags (only {allowed} may change)")


def read_metrics(path) -> List[dict]:
    """The records of a ``metrics.jsonl``, each training step counted once.

    After a resume the replayed steps are logged again: of the records with the same (event, stage,
    step), the last one is kept, at its place in the file. Every reader of the file should use this.
    """
    path = Path(path)
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                raise ValueError(f"{path}:{n}: not a JSON record") from None

    def key(r):
        return r.get("event"), r.get("stage"), r.get("step", r.get("steps"))

    last = {key(r): i for i, r in enumerate(records)}
    return [r for i, r in enumerate(records) if last[key(r)] == i]


def save_model(model, tokenizer, directory, train_state: Optional[dict] = None) -> None:
    """The rmt_fast format plus the tokenizer's files (and ``train_state.pt``), so the directory alone
    classifies text (and resumes). Written beside it and swapped in crash-safely; the file written last
    (config.json, or train_state.pt) marks a complete copy."""
    new = files.new_dir_path(directory)
    if new.exists():
        shutil.rmtree(new)
    new.mkdir(parents=True)
    tokenizer.save_pretrained(str(new))
    model.save_pretrained(new)
    if train_state is not None:
        with files.atomic_path(new / "train_state.pt") as tmp:
            torch.save(train_state, tmp)
    files.replace_dir(new, directory)


def is_resumable(directory: Path) -> bool:
    return (directory / "train_state.pt").is_file()
