"""The vectorised segmentation against the oracle's plain-list reading of the reference."""
import random

import pytest
import torch

from oracle import segments_of
from rmt_fast import RMTConfig
from rmt_fast import segmentation as sg


def _config(alignment, max_n_segments=None, input_size=16, M=3):
    return RMTConfig(vocab_size=40, num_mem_tokens=M, input_size=input_size, cls_token_id=1, sep_token_id=2,
                     pad_token_id=0, segment_alignment=alignment, max_n_segments=max_n_segments)


def _segments(docs, cfg):
    d = sg.clean_and_truncate(docs, cfg)
    s = sg.cut(d, cfg)
    out = [[] for _ in docs]
    for g in range(len(s)):
        a, n = int(s.start[g]), int(s.length[g])
        out[int(s.doc[g])].append(d.tokens[a:a + n].tolist())
    return out, s


@pytest.mark.parametrize("alignment", ["right", "left", "center"])
@pytest.mark.parametrize("max_n_segments", [None, 1, 3])
def test_cuts_match_reference(alignment, max_n_segments):
    cfg = _config(alignment, max_n_segments)
    S = cfg.segment_size  # 10
    lengths = [0, 1, 2, S - 1, S, S + 1, 2 * S - 1, 2 * S, 2 * S + 1, 37, 53] + [random.randint(0, 80) for _ in range(8)]
    # Special ids sprinkled in: they must vanish before cutting.
    docs = [torch.randint(0, 40, (n,)) for n in lengths]
    got, segs = _segments(docs, cfg)
    for i, doc in enumerate(docs):
        want = segments_of(doc.tolist(), S, max_n_segments, alignment, {0, 1, 2})
        assert got[i] == want, (i, len(doc))
        assert int(segs.count[i]) == len(want)


def test_right_alignment_puts_remainder_first():
    cfg = _config("right")
    docs = [torch.arange(3, 3 + 23) % 37 + 3]
    got, _ = _segments(docs, cfg)
    assert [len(s) for s in got[0]] == [3, 10, 10]


def test_layout_matches_reference_layout():
    cfg = _config("right")
    M, T = cfg.num_mem_tokens, cfg.input_size
    tokens = torch.arange(100, dtype=torch.int64) % 30 + 5
    start, length = torch.tensor([0, 7, 40]), torch.tensor([10, 1, 0])
    ids = sg.layout(tokens, start, length, cfg)
    for b in range(3):
        a, n = int(start[b]), int(length[b])
        row = [1] + list(range(40, 40 + M)) + [2] + tokens[a:a + n].tolist() + [2]
        row += [0] * (T - len(row))
        assert ids[b].tolist() == row
    assert sg.key_lengths(length, cfg).tolist() == [M + 3 + 10, M + 3 + 1, M + 3]


@pytest.mark.parametrize("alignment", ["right", "left", "center"])
@pytest.mark.parametrize("max_n_segments", [None, 2])
@pytest.mark.parametrize("with_specials", [False, True])
def test_single_document_paths(alignment, max_n_segments, with_specials):
    """One document takes the no-copy paths; the cuts must not change."""
    cfg = _config(alignment, max_n_segments)
    doc = torch.randint(0 if with_specials else 3, 40, (random.randint(1, 60),))
    got, _ = _segments([doc], cfg)
    assert got[0] == segments_of(doc.tolist(), cfg.segment_size, max_n_segments, alignment, {0, 1, 2})
