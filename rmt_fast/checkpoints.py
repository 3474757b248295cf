"""Checkpoints: the reference's ``model_best.pth`` in and out, rmt_fast's safetensors + JSON in and out.

rmt_fast's own format is a directory with ``model.safetensors`` (the state dict) and ``config.json``
({"format": "rmt_fast", "version": 1, "rmt": RMTConfig, "backbone": transformers config}).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

import torch

from .config import RMTConfig
from .model import RMTForSequenceClassification

FORMAT_VERSION = 1
# Keys the reference's checkpoints may hold that the model does not: older transformers saved the
# position_ids buffer, and the reference keeps `model.embeddings` as an alias of the word embeddings.
_POSITION_IDS = "model.bert.embeddings.position_ids"
_ALIAS = "model.embeddings.weight"
_WORD_EMBEDDINGS = "model.bert.embeddings.word_embeddings.weight"


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors do not match the model its config describes."""


def load_backbone_config(backbone_config):
    """A transformers config from a config object, a ``config.json`` path, or a directory holding one."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(backbone_config, PretrainedConfig):
        return backbone_config
    path = Path(backbone_config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"backbone config not found: {path}")
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    if "model_type" not in d:
        raise ValueError(f"{path} has no 'model_type'; is it a transformers config.json?")
    return AutoConfig.for_model(d.pop("model_type"), **d)


def check_state_dict(model: torch.nn.Module, state: dict, source: str) -> None:
    """Raise one CheckpointMismatchError listing every missing, unexpected and mis-shaped key."""
    expected = model.state_dict()
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

def from_reference_checkpoint(path: Union[str, os.PathLike], backbone_config, num_labels: int | None = None,
                              **rmt_kwargs) -> RMTForSequenceClassification:
    """Load the reference implementation's ``model_best.pth`` (or a bare state dict).

    backbone_config: the backbone's transformers config (object, ``config.json`` path or directory), with
    the tokenizer's vocabulary size (as bert-base-cased's config.json) or the extended one.
    The memory-token count, tokenizer vocabulary, [CLS]/[SEP] ids and label count are read from the
    checkpoint itself; rmt_kwargs (input_size, segment_alignment, max_n_segments...) set the rest.
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = dict(ckpt.get("model_state_dict", ckpt)) if isinstance(ckpt, dict) else None
    if state is None or "mem_token_ids" not in state:
        raise CheckpointMismatchError(f"{path} is not an RMT checkpoint: no 'mem_token_ids' in its state dict")
    state.pop(_POSITION_IDS, None)
    alias = state.pop(_ALIAS, None)
    if alias is not None and _WORD_EMBEDDINGS in state and not torch.equal(alias, state[_WORD_EMBEDDINGS]):
        raise CheckpointMismatchError(f"{path}: '{_ALIAS}' should alias '{_WORD_EMBEDDINGS}' but differs from it")
    if _WORD_EMBEDDINGS not in state and alias is not None:
        state[_WORD_EMBEDDINGS] = alias

    mem_ids = state["mem_token_ids"]
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
    config = RMTConfig(vocab_size=V, num_mem_tokens=M, num_labels=num_labels,
                       cls_token_id=int(state["cls_token"][0]), sep_token_id=int(state["sep_token"][0]),
                       pad_token_id=bconf.pad_token_id if bconf.pad_token_id is not None else 0, **rmt_kwargs)
    bconf.vocab_size = V
    model = RMTForSequenceClassification.from_configs(config, bconf)
    check_state_dict(model, state, str(path))
    model.load_state_dict(state)
    return model.eval()


def save_reference_checkpoint(model: RMTForSequenceClassification, path: Union[str, os.PathLike]) -> None:
    """Write ``model_best.pth`` as the reference does, alias included, so the reference can load it."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    state[_ALIAS] = state[_WORD_EMBEDDINGS]
    torch.save({"model_state_dict": state}, path)


# -- rmt_fast's format ---------------------------------------------------------------------------

def save_pretrained(model: RMTForSequenceClassification, directory: Union[str, os.PathLike]) -> None:
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    backbone = model.model.config.to_dict()
    backbone["vocab_size"] = model.config.vocab_size  # the tokenizer's; memory rows are added on load
    meta = {"format": "rmt_fast", "version": FORMAT_VERSION, "rmt": model.config.to_dict(), "backbone": backbone}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")


def from_pretrained(directory: Union[str, os.PathLike]) -> RMTForSequenceClassification:
    from safetensors.torch import load_file
    from transformers import AutoConfig

    d = Path(directory)
    for name in ("config.json", "model.safetensors"):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d} is not an rmt_fast model directory: {name} is missing")
    meta = json.loads((d / "config.json").read_text(encoding="utf-8"))
    if meta.get("format") != "rmt_fast" or meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{d / 'config.json'}: not an rmt_fast format {FORMAT_VERSION} config")
    backbone = dict(meta["backbone"])
    bconf = AutoConfig.for_model(backbone.pop("model_type"), **backbone)
    model = RMTForSequenceClassification.from_configs(RMTConfig.from_dict(meta["rmt"]), bconf)
    state = load_file(str(d / "model.safetensors"))
    check_state_dict(model, state, str(d / "model.safetensors"))
    model.load_state_dict(state)
    return model.eval()


def load_model(path: Union[str, os.PathLike], backbone_config=None, **rmt_kwargs) -> RMTForSequenceClassification:
    """An rmt_fast directory, or a reference ``.pth`` file (which needs ``backbone_config``)."""
    p = Path(path)
    if p.is_dir():
        return from_pretrained(p)
    if not p.is_file():
        raise FileNotFoundError(f"no model at {p}")
    if backbone_config is None:
        raise ValueError(f"{p} is a reference checkpoint: give its backbone config (--backbone-config)")
    return from_reference_checkpoint(p, backbone_config, **rmt_kwargs)
