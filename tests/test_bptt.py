"""Backpropagation through the memory: which segments get gradient, and the gradients themselves.

bptt_depth k (the official RMT flag, "max number of previous segments in gradient computation"): the
loss reaches the current segment and the k segments before it; -1 reaches every segment and the
initial memory (the trained memory-token rows).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig

from helpers import make_model
from oracle import oracle_logits
from rmt_fast import RMTConfig

N_SEGMENTS = 5


def _model(bptt_depth, vocab_size=60):
    bc = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=64, initializer_range=0.2)
    # input_size 12 with 3 memory tokens: 6 text tokens per segment
    return make_model(bc, num_mem_tokens=3, input_size=12, cls_token_id=1, sep_token_id=2, pad_token_id=0,
                      bptt_depth=bptt_depth)


def _rows_with_gradient(grad):                                                  # grad: [V + M, H]
    return set((grad.abs().sum(1) > 0).nonzero().flatten().tolist())


@pytest.mark.parametrize("depth,segments_with_gradient", [
    (-1, {0, 1, 2, 3, 4}), (0, {4}), (1, {3, 4}), (2, {2, 3, 4}), (4, {0, 1, 2, 3, 4})])
def test_exactly_the_last_depth_plus_one_segments_get_gradient(depth, segments_with_gradient):
    model = _model(depth)
    cfg = model.config
    S = cfg.segment_size
    # Segment i holds the ids 3 + i*S .. 3 + (i+1)*S - 1: each id belongs to exactly one segment.
    doc = torch.arange(3, 3 + N_SEGMENTS * S)
    segment_of = {3 + j: j // S for j in range(N_SEGMENTS * S)}
    out = model(doc[None], labels=torch.tensor([1]))
    out.loss.backward()
    rows = _rows_with_gradient(model.model.get_input_embeddings().weight.grad)
    got = {segment_of[r] for r in rows if r in segment_of}
    assert got == segments_with_gradient
    # [CLS] and [SEP] are in the current segment; [PAD] never is an input here.
    assert {cfg.cls_token_id, cfg.sep_token_id} <= rows and cfg.pad_token_id not in rows
    # The initial memory (rows V..V+M-1) is reached only when every segment is.
    reaches_init = depth == -1 or depth >= N_SEGMENTS
    assert set(cfg.mem_token_ids) & rows == (set(cfg.mem_token_ids) if reaches_init else set())


@pytest.mark.parametrize("depth", [-1, 0, 1, 2])
def test_gradients_match_the_oracle_with_autograd_through_depth_segments(depth):
    """A batch of mixed lengths (1, 3 and 5 segments), float64: every parameter's gradient."""
    model = _model(depth).double()
    cfg = model.config
    S = cfg.segment_size
    docs = [torch.randint(3, 60, (n,)) for n in (S - 2, 3 * S, 4 * S + 1)]
    labels = torch.randint(0, cfg.num_labels, (len(docs),))
    model(docs, labels=labels).loss.backward()
    got = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    ref = copy.deepcopy(model)
    ref.zero_grad(set_to_none=True)
    losses = [F.cross_entropy(oracle_logits(ref.model, d, vocab_size=cfg.vocab_size, num_mem_tokens=cfg.num_mem_tokens,
                                            input_size=cfg.input_size, cls_id=1, sep_id=2, pad_id=0,
                                            alignment="right", bptt_depth=depth)[None], y[None])
              for d, y in zip(docs, labels)]
    torch.stack(losses).mean().backward()   # the last segment's loss, averaged over the batch
    want = {name: p.grad for name, p in ref.named_parameters() if p.grad is not None}

    assert got.keys() == want.keys()
    scale = max(g.abs().max().item() for g in want.values())
    for name in want:
        assert (got[name] - want[name]).abs().max().item() <= 1e-10 * scale, name
    # The initial memory (rows V..) is reached by the one-segment document from depth 1 on, by none at 0.
    mem_rows = want["model.bert.embeddings.word_embeddings.weight"][cfg.vocab_size:]
    assert (mem_rows.abs().max() > 0) == (depth != 0)


def test_bptt_depth_validation():
    for ok in (-1, 0, 1, 7):
        assert RMTConfig(vocab_size=200, bptt_depth=ok).bptt_depth == ok
    for bad in (-2, 1.5, True, None):
        with pytest.raises(ValueError, match="bptt_depth"):
            RMTConfig(vocab_size=200, bptt_depth=bad)
