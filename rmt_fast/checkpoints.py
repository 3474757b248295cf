"""Checkpoint formats: the reference's ``model_best.pth`` and rmt_fast's safetensors + JSON, in and out.

rmt_fast's own format is a directory with ``model.safetensors`` (the state dict) and ``config.json``
({"format": "rmt_fast", "version": 1, "rmt": RMTConfig, "backbone": transformers config}).

This module turns files into plain data (an ``RMTConfig``, a transformers config, a state dict) and
back, and checks them; ``RMTForSequenceClassification`` (``model.py``) builds itself from that data, so
the imports point one way: model -> checkpoints. Every problem with a file raises a ``CheckpointError``
(a ValueError) whose message names the file.
"""
from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Tuple, Union

import torch

from . import files
from .config import RMTConfig

FORMAT_VERSION = 1
# Keys the reference's checkpoints may hold that the model does not: older transformers saved the
# position_ids buffer, and the reference keeps `model.embeddings` as an alias of the word embeddings.
_POSITION_IDS = "model.bert.embeddings.position_ids"
_ALIAS = "model.embeddings.weight"
_WORD_EMBEDDINGS = "model.bert.embeddings.word_embeddings.weight"

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A model file that cannot be loaded; the message names the file and the problem."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint's tensors do not match the model its config describes."""


# -- reading files ---------------------------------------------------------------------------------

def read_json_object(path: PathLike) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found a {type(data).__name__}")
    return data


def _backbone_config_from_dict(d: dict, source) -> "object":
    from transformers import AutoConfig

    d = dict(d)
    model_type = d.pop("model_type", None)
    if not isinstance(model_type, str):
        raise CheckpointError(f"{source} has no 'model_type'; is it a transformers config.json?")
    try:
        return AutoConfig.for_model(model_type, **d)
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{source}: not a usable transformers config ({e})") from None


def load_backbone_config(backbone_config):
    """A transformers config from a config object, a ``config.json`` path, or a directory holding one."""
    from transformers import PretrainedConfig

    if isinstance(backbone_config, PretrainedConfig):
        return backbone_config
    path = Path(backbone_config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"backbone config not found: {path}")
    return _backbone_config_from_dict(read_json_object(path), path)


def torch_load_safely(path: PathLike):
    """``torch.load(path, weights_only=True)``; a file it refuses or cannot read is a CheckpointError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if zipfile.is_zipfile(path):
            why = "it holds Python objects other than tensors and plain containers"
        else:
            why = "it is not a PyTorch checkpoint, or is corrupt"
        raise CheckpointError(f"{path}: not a checkpoint that can be loaded safely ({why})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: truncated or not a PyTorch checkpoint "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'empty'})") from None


def _load_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise CheckpointError(f"{path}: truncated or not a safetensors file ({e})") from None


def check_state_dict(expected: dict, state: dict, source: str) -> None:
    """Raise one CheckpointMismatchError listing every missing, unexpected and mis-shaped key.

    expected: the model's state dict (names and shapes are read).
    """
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if misshaped:
            parts.append(f"mis-shaped tensors {misshaped}")
        raise CheckpointMismatchError(f"{source} does not match its config: " + "; ".join(parts))


# -- the reference's format ----------------------------------------------------------------------

def _id_tensor(state: dict, key: str, path) -> torch.Tensor:
    t = state.get(key)
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() == 0 or t.is_floating_point():
        found = "missing" if t is None else f"{type(t).__name__} {tuple(getattr(t, 'shape', ()))}"
        raise CheckpointMismatchError(f"{path}: '{key}' must be a non-empty 1-D integer tensor, found {found}")
    return t


def read_reference_checkpoint(path: PathLike, backbone_config, num_labels: int | None = None,
                              **rmt_kwargs) -> Tuple[RMTConfig, object, dict]:
    """(RMTConfig, backbone config, state dict) of the reference implementation's ``model_best.pth``.

    See ``RMTForSequenceClassification.from_reference_checkpoint`` for the arguments.
    """
    ckpt = torch_load_safely(path)
    state = ckpt.get("model_state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or "mem_token_ids" not in state:
        raise CheckpointMismatchError(f"{path} is not an RMT checkpoint: no 'mem_token_ids' in its state dict")
    state = dict(state)
    bad = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise CheckpointMismatchError(f"{path}: state dict entries {bad[:5]} are not tensors")
    state.pop(_POSITION_IDS, None)
    alias = state.pop(_ALIAS, None)
    if alias is not None and _WORD_EMBEDDINGS in state and not torch.equal(alias, state[_WORD_EMBEDDINGS]):
        raise CheckpointMismatchError(f"{path}: '{_ALIAS}' should alias '{_WORD_EMBEDDINGS}' but differs from it")
    if _WORD_EMBEDDINGS not in state and alias is not None:
        state[_WORD_EMBEDDINGS] = alias

    mem_ids = _id_tensor(state, "mem_token_ids", path)
    cls_id, sep_id = (int(_id_tensor(state, k, path)[0]) for k in ("cls_token", "sep_token"))
    M, V = mem_ids.numel(), int(mem_ids[0])
    if not torch.equal(mem_ids, torch.arange(V, V + M)):
        raise CheckpointMismatchError(f"{path}: mem_token_ids {mem_ids.tolist()} are not consecutive ids")
    bconf = load_backbone_config(backbone_config)
    if bconf.vocab_size not in (V, V + M):
        raise CheckpointMismatchError(
            f"{path} has {M} memory tokens after a vocabulary of {V}, but the backbone config says "
            f"vocab_size={bconf.vocab_size} (expected {V} or {V + M})")
    if num_labels is None:
        if "model.classifier.weight" not in state:
            raise CheckpointMismatchError(f"{path}: no 'model.classifier.weight' in its state dict")
        num_labels = state["model.classifier.weight"].shape[0]
    try:
        config = RMTConfig(vocab_size=V, num_mem_tokens=M, num_labels=num_labels, cls_token_id=cls_id,
                           sep_token_id=sep_id, pad_token_id=bconf.pad_token_id if bconf.pad_token_id is not None
                           else 0, **rmt_kwargs)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    bconf.vocab_size = V
    return config, bconf, state


def save_reference_checkpoint(model, path: PathLike) -> None:
    """Write ``model_best.pth`` as the reference does, alias included, so the reference can load it."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    state[_ALIAS] = state[_WORD_EMBEDDINGS]
    with files.atomic_path(path) as tmp:
        torch.save({"model_state_dict": state}, tmp)


# -- rmt_fast's format ---------------------------------------------------------------------------

def save_pretrained(model, directory: PathLike) -> None:
    """``model.safetensors`` + ``config.json`` of an ``RMTForSequenceClassification``, each written atomically."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    backbone = model.model.config.to_dict()
    backbone["vocab_size"] = model.config.vocab_size  # the tokenizer's; memory rows are added on load
    meta = {"format": "rmt_fast", "version": FORMAT_VERSION, "rmt": model.config.to_dict(), "backbone": backbone}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with files.atomic_path(d / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    files.write_text(d / "config.json", json.dumps(meta, indent=2))


def is_pretrained_dir(directory: PathLike) -> bool:
    d = Path(directory)
    return (d / "config.json").is_file() and (d / "model.safetensors").is_file()


def read_pretrained(directory: PathLike) -> Tuple[RMTConfig, object, dict]:
    """(RMTConfig, backbone config, state dict) of a directory written by ``save_pretrained``."""
    d = Path(directory)
    for name in ("config.json", "model.safetensors"):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d} is not an rmt_fast model directory: {name} is missing")
    source = d / "config.json"
    meta = read_json_object(source)
    if meta.get("format") != "rmt_fast" or meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{source}: not an rmt_fast format {FORMAT_VERSION} config")
    for key in ("rmt", "backbone"):
        if not isinstance(meta.get(key), dict):
            raise CheckpointError(f"{source}: '{key}' must be a JSON object")
    try:
        config = RMTConfig.from_dict(meta["rmt"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: bad 'rmt' section ({e})") from None
    bconf = _backbone_config_from_dict(meta["backbone"], f"{source} ('backbone')")
    return config, bconf, _load_safetensors(d / "model.safetensors")
