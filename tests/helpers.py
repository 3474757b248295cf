"""Models and documents the tests share."""
from pathlib import Path

import torch
from transformers import BertConfig

from oracle import oracle_logits
from rmt_fast import RMTConfig, RMTForSequenceClassification

ASSETS = Path(__file__).resolve().parents[1] / "rmt_fast" / "data" / "bert-base-cased"


def bert_base_cased_config(num_layers=2, **overrides):
    """bert-base-cased's shape with fewer layers; a wider init than BERT's so logits depend on the input."""
    d = dict(BertConfig.from_json_file(str(ASSETS / "config.json")).to_dict())
    d.update(num_hidden_layers=num_layers, initializer_range=0.05, **overrides)
    return BertConfig(**d)


def make_model(bert_config, **rmt_kwargs):
    kw = dict(vocab_size=bert_config.vocab_size, num_labels=6)
    kw.update(rmt_kwargs)
    return RMTForSequenceClassification.from_configs(RMTConfig(**kw), bert_config).eval()


def tiny_model(num_mem_tokens=3, input_size=24, **rmt_kwargs):
    bc = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=64, initializer_range=0.2)
    return make_model(bc, num_mem_tokens=num_mem_tokens, input_size=input_size, cls_token_id=1,
                      sep_token_id=2, pad_token_id=0, **rmt_kwargs)


WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "away", ".", ","]


def save_model_with_vocab(directory, **rmt_kwargs):
    """A tiny model saved with a WordPiece vocabulary of WORDS, as the CLI loads it: (model, directory)."""
    model = tiny_model(label_names=("a", "b", "c", "d", "e", "f"), **rmt_kwargs)
    model.save_pretrained(directory)
    vocab = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"] + WORDS
    vocab += [f"w{i}" for i in range(model.config.vocab_size - len(vocab))]
    (Path(directory) / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return model, Path(directory)


def random_docs(lengths, vocab_size, low=103):
    """Documents of ordinary ids (no special ids) of the given lengths."""
    return [torch.randint(low, vocab_size, (n,)) for n in lengths]


@torch.no_grad()
def oracle(model, doc, dtype=torch.float32, alignment="right", **kw):
    """The oracle's logits for one document, on a copy of the model's backbone in ``dtype``.

    ``alignment`` is the test's own statement (the reference's default is right), never read from the
    model's config: a test of another alignment passes it. A model configured otherwise is refused, so
    a wrong default alignment in RMTConfig fails every oracle test instead of changing both sides.
    """
    cfg = model.config
    if cfg.segment_alignment != alignment:
        raise AssertionError(f"the model is configured with segment_alignment={cfg.segment_alignment!r} but the "
                             f"test states {alignment!r}: pass oracle(..., alignment=...)")
    backbone = model.model if dtype == torch.float32 else _copy_as(model.model, dtype)
    return oracle_logits(backbone, doc, vocab_size=cfg.vocab_size, num_mem_tokens=cfg.num_mem_tokens,
                         input_size=cfg.input_size, cls_id=cfg.cls_token_id, sep_id=cfg.sep_token_id,
                         pad_id=cfg.pad_token_id, alignment=alignment, max_n_segments=cfg.max_n_segments,
                         **kw).double()


def _copy_as(module, dtype):
    import copy
    return copy.deepcopy(module).to(dtype)
