"""The plain PyTorch forward (the training path) against the oracle, and the default alignment."""
import pytest
import torch

from helpers import oracle, random_docs, tiny_model
from oracle import oracle_logits
from rmt_fast import Engine, RMTConfig


@pytest.mark.parametrize("train_mode", [False, True], ids=["eval", "train_without_dropout"])
def test_forward_on_a_batch_of_mixed_lengths_matches_the_oracle_per_document(train_mode):
    """Lengths 5, 40, 17, 90 (1, 3, 1 and 5 segments of 18): right-aligned, every document ends on the last step."""
    model = tiny_model()
    if train_mode:   # the training path, with dropout off so that it is deterministic
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        model.train()
    cfg = model.config
    docs = random_docs([5, 40, 17, 90], cfg.vocab_size, low=3)
    out = model(docs)
    want = torch.stack([oracle(model, d, alignment="right") for d in docs])
    assert out.logits.shape == want.shape
    assert (out.logits.double() - want).abs().max() <= 1e-4
    assert want.std(0).max() > 1e-2, "logits barely depend on the input: the comparison would be vacuous"
    # The memory after each document's last segment, too.
    with torch.no_grad():
        memories = [oracle_logits(model.model, d, vocab_size=cfg.vocab_size, num_mem_tokens=cfg.num_mem_tokens,
                                  input_size=cfg.input_size, cls_id=1, sep_id=2, pad_id=0, alignment="right",
                                  return_memory=True)[1] for d in docs]
    assert (out.memory - torch.stack(memories)).abs().max() <= 1e-4


def test_forward_takes_a_padded_id_tensor_like_the_reference():
    """A [B, L] tensor right-padded with [PAD]: the padding is removed before segmenting."""
    model = tiny_model()
    docs = random_docs([5, 40, 17, 90], model.config.vocab_size, low=3)
    padded = torch.zeros(len(docs), 90, dtype=torch.int64)
    for i, d in enumerate(docs):
        padded[i, :len(d)] = d
    with torch.no_grad():
        got = model(padded).logits
    want = torch.stack([oracle(model, d) for d in docs])
    assert (got.double() - want).abs().max() <= 1e-4


def test_default_alignment_is_right():
    """The reference cuts from the end (docs/REFERENCE.md): pinned here, and by every oracle test through helpers.oracle."""
    assert RMTConfig(vocab_size=200).segment_alignment == "right"
    model = tiny_model()
    assert model.config.segment_alignment == "right"
    doc = random_docs([18 + 5], model.config.vocab_size, low=3)[0]   # 5 + 18: the cuts differ left and right
    got = Engine(model).classify([doc])[0].double()
    right = oracle(model, doc, alignment="right")
    model.config = model.config.replace(segment_alignment="left")
    left = oracle(model, doc, alignment="left")
    assert (got - right).abs().max() <= 1e-4 and (got - left).abs().max() > 1e-2
