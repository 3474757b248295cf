"""Per-segment logits: ``Engine.classify(..., per_segment=True)`` against the oracle at every segment, and
the compat class's eval-with-labels fast path (``loss_0..loss_{n-1}`` from them) against its plain path."""
import pytest
import torch

from helpers import oracle, random_docs, tiny_model
from oracle import segments_of
from rmt_fast.compat import RMTEncoderForSequenceClassification
from rmt_fast.engine import Engine
from test_compat import batch, compat_model

S = 24 - 3 - 3       # text tokens per segment of tiny_model()


def oracle_per_segment(model, doc, alignment):
    """[n_segments, C] float64: the oracle's logits after each segment. With right or left alignment the
    first k segments of a document, as a document, are cut into exactly those k segments."""
    cfg = model.config
    specials = {cfg.cls_token_id, cfg.sep_token_id, cfg.pad_token_id}
    segs = segments_of(doc.tolist(), S, cfg.max_n_segments, alignment, specials) or [[]]
    return torch.stack([oracle(model, torch.tensor(sum(segs[:k], []), dtype=torch.long), alignment=alignment,
                               empty_as_special=True) for k in range(1, len(segs) + 1)])


@pytest.mark.parametrize("alignment", ["right", "left"])
def test_engine_per_segment_logits_match_the_oracle_at_every_segment(alignment):
    model = tiny_model(segment_alignment=alignment, max_n_segments=3)
    # Segment boundaries (S-1, S, S+1, 2S, 2S+1), one segment, an empty document, one cut past 3 segments.
    docs = random_docs([S - 1, 2 * S + 1, 1, S, 0, S + 1, 2 * S, 5 * S + 4], 60, low=3)
    engine = Engine(model)
    with pytest.warns(UserWarning, match="exceed max_n_segments"):
        got = engine.classify(docs, batch_size=3, empty="special", per_segment=True)
        last = engine.classify(docs, batch_size=3, empty="special")
    assert len(got) == len(docs)
    for d, doc in enumerate(docs):
        want = oracle_per_segment(model, doc, alignment)
        assert got[d].shape == want.shape, d
        assert (got[d].double() - want).abs().max() < 1e-4, d
        assert torch.equal(got[d][-1], last[d])              # the last row is the default's answer
    assert engine.classify([], per_segment=True) == []


def test_engine_per_segment_over_more_chunks_than_the_ring_holds():
    """64 slots run 8 steps a chunk: ~30 steps pass through the chunk ring (chunking.RING buffers, reused)
    while documents of 1-6 segments turn the slots over; each document alone fits one chunk."""
    model = tiny_model()
    lengths = torch.randint(1, 6 * S, (600,)).tolist()
    docs = random_docs(lengths, 60, low=3)
    engine = Engine(model)
    got = engine.classify(docs, batch_size=64, per_segment=True)
    assert [len(x) for x in got] == [-(-n // S) for n in lengths]
    for d in torch.randperm(len(docs))[:6].tolist():
        alone = engine.classify([docs[d]], batch_size=1, per_segment=True)[0]
        assert (got[d] - alone).abs().max() < 1e-5, d


def test_engine_per_segment_runs_the_compact_loop_where_the_static_loop_is_the_default():
    """The static loop (CUDA's, settable on the CPU) keeps no per-segment rows: per_segment runs compact."""
    model = tiny_model()
    docs = random_docs([S + 3, 3 * S, 7], 60, low=3)
    engine = Engine(model)
    want = engine.classify(docs, per_segment=True)
    engine.static_loop = True
    got = engine.classify(docs, per_segment=True)
    assert [x.shape for x in got] == [x.shape for x in want]
    assert all((g - w).abs().max() < 1e-5 for g, w in zip(got, want))
    assert (engine.classify(docs) - torch.stack([w[-1] for w in want])).abs().max() < 1e-5


def test_engine_per_segment_rejects_a_non_bool():
    with pytest.raises(ValueError, match="per_segment"):
        Engine(tiny_model()).classify([torch.arange(3, 9)], per_segment=1)


LENGTHS = [40, 7, 90, 18, 19, 36, 55]   # 3, 1, 5 (cut to 4), 1, 2, 2, 4 segments; padded to the longest


@pytest.mark.parametrize("sum_loss", [False, True])
@pytest.mark.parametrize("grad_off", ["no_grad", "inference_mode"])
def test_compat_eval_labels_fast_path_equals_the_plain_path(sum_loss, grad_off, monkeypatch):
    model = compat_model(sum_loss=sum_loss)
    ids, mask = batch(LENGTHS)
    labels = torch.randint(0, 4, (len(LENGTHS),))
    calls = []
    classify = Engine.classify
    monkeypatch.setattr(Engine, "classify", lambda self, *a, **kw: calls.append(kw) or classify(self, *a, **kw))
    with getattr(torch, grad_off)():
        out = model(ids, mask, labels=labels)
        want = model._plain(ids, labels, False, False)
    assert [kw.get("per_segment") for kw in calls] == [True]   # the Engine answered, per segment
    assert list(out.keys()) == list(want.keys()) == ["loss", "logits", "hidden_states"] + [
        f"loss_{i}" for i in range(4)]
    for k in want.keys():
        if want[k] is not None:
            assert out[k].shape == want[k].shape, k
            assert (out[k] - want[k]).abs().max() <= 1e-5, k
            assert grad_off == "inference_mode" or not out[k].is_inference(), k   # the caller's mode only
    assert out.hidden_states is None


def test_compat_per_segment_losses_cover_the_documents_in_each_step():
    """Step i's loss is over the documents that have a segment at step i (right-aligned): here a
    one-segment document with a huge loss must appear in the last step's loss only."""
    model = compat_model(num_labels=1)
    ids, _ = batch([50, 7])                   # 3 segments and 1: document 1 runs at step 2 only
    labels = torch.tensor([0.0, 1e4])
    with torch.no_grad():
        out = model(ids, labels=labels)
    assert model._engine is not None
    assert out.loss_0 < 1e3 and out.loss_1 < 1e3 and out.loss_2 > 1e6


def test_compat_labels_count_must_match_the_documents():
    model = compat_model()
    ids, _ = batch([40, 7])
    with torch.no_grad(), pytest.raises(ValueError, match="3 labels for 2 documents"):
        model(ids, labels=torch.tensor([0, 1, 2]))


def test_grad_on_with_labels_still_takes_the_plain_path(monkeypatch):
    model = compat_model()
    ids, _ = batch([40, 7])
    monkeypatch.setattr(Engine, "classify", lambda *a, **kw: pytest.fail("the Engine ran with grad on"))
    out = model(ids, labels=torch.tensor([0, 1]))
    assert out.loss.requires_grad and isinstance(model, RMTEncoderForSequenceClassification)
