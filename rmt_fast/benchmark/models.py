"""The model a benchmark runs: a built-in shape with random weights, or the user's own checkpoint.

Speed and memory do not depend on the weights' values, so a shape with random weights measures what a
trained model of that shape would.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

DATA = Path(__file__).resolve().parents[1] / "data"

# Changes to bert-base-cased's config.json (rmt_fast/data/bert-base-cased) for each built-in shape.
SHAPES = {
    "bert-base": {},
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    # MiniLM-L12-H384 (microsoft/MiniLM-L12-H384-uncased): BERT layers, hidden 384, 12 heads.
    "minilm": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=12, intermediate_size=1536,
                   vocab_size=30522),
}


def shape_model(shape: str = "bert-base", num_layers: Optional[int] = None, num_labels: int = 6):
    """A random-weight RMT classifier of a built-in shape (M = 10, input_size 512); ``num_layers``
    overrides the shape's depth."""
    from transformers import BertConfig

    from ..config import RMTConfig
    from ..model import RMTForSequenceClassification

    if shape not in SHAPES:
        raise ValueError(f"--shape {shape!r}: expected one of {', '.join(SHAPES)}")
    bconf = BertConfig.from_json_file(str(DATA / "bert-base-cased" / "config.json"))
    for key, value in SHAPES[shape].items():
        setattr(bconf, key, value)
    if num_layers is not None:
        bconf.num_hidden_layers = num_layers
    cfg = RMTConfig(vocab_size=bconf.vocab_size, num_mem_tokens=10, input_size=512, num_labels=num_labels)
    return RMTForSequenceClassification.from_configs(cfg, bconf).eval()


def user_model(path, backbone_config=None, num_layers: Optional[int] = None):
    """An rmt_fast folder or a reference ``model_best.pth`` (with its backbone config); ``num_layers``
    keeps the first layers only (a quicker run of the same width)."""
    from ..model import RMTForSequenceClassification

    model = RMTForSequenceClassification.load(path, backbone_config=backbone_config).eval()
    if num_layers is not None:
        layers = model.bert.encoder.layer
        if num_layers > len(layers):
            raise ValueError(f"--layers {num_layers}: the model at {path} has {len(layers)} layers")
        model.bert.encoder.layer = layers[:num_layers]
        model.model.config.num_hidden_layers = num_layers
    return model


def describe(model) -> str:
    b = model.model.config
    return (f"{b.num_hidden_layers} layers, hidden {b.hidden_size}, {b.num_attention_heads} heads, "
            f"input_size {model.config.input_size}, M = {model.config.num_mem_tokens}, "
            f"{model.config.segment_size} text tokens per segment")
