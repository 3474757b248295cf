"""Engine options and reports (issues 10, 11, 12, 19): an explicit request that cannot be met fails at
construction; the truncation warning means that tokens were cut; the plan says what ran."""
import warnings

import pytest
import torch

from helpers import oracle, random_docs, tiny_model
from rmt_fast import Engine


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_graphs_requested_on_the_cpu_fails_like_packed_weights_on_float16():
    model = tiny_model()
    with pytest.raises(ValueError, match="cuda_graphs=True is not possible here: device cpu is not a CUDA GPU"):
        Engine(model, cuda_graphs=True)
    with pytest.raises(ValueError, match="packed_weights=True is not possible here"):
        Engine(model, dtype=torch.float16, packed_weights=True)
    assert Engine(model, cuda_graphs=False).graphs_status.startswith("off")
    assert Engine(model).graphs_status.startswith("off")      # None: chosen quietly


@pytest.mark.parametrize("option,value", [("cuda_graphs", "yes"), ("packed_weights", 1), ("overlap", "no"),
                                          ("overlap", None)])
def test_option_values_of_the_wrong_type_are_refused(option, value):
    with pytest.raises(ValueError, match=f"{option} must be"):
        Engine(tiny_model(), **{option: value})


@pytest.mark.parametrize("attention,message", [("nope", "unknown attention backend 'nope'"),
                                               ("cpp", "attention backend 'cpp' cannot run here")])
def test_an_attention_backend_that_cannot_run_fails_at_construction(attention, message, monkeypatch):
    from rmt_fast import _ext
    monkeypatch.setattr(_ext, "attention_why_unavailable", lambda *a: "turned off by the test")
    with pytest.raises(RuntimeError, match=message):
        Engine(tiny_model(), attention=attention)


def _truncation_warnings(engine, docs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = engine.classify(docs, batch_size=2)
    return got, [str(w.message) for w in caught if "max_n_segments" in str(w.message)]


def test_truncation_warning_only_when_ordinary_tokens_were_cut():
    """S x max_n_segments ordinary tokens plus special ids: nothing is cut, so no warning; one more: a warning."""
    model = tiny_model(max_n_segments=2)
    cfg = model.config
    limit = cfg.segment_size * cfg.max_n_segments
    specials = torch.tensor([cfg.cls_token_id, cfg.sep_token_id, cfg.pad_token_id] * 2)

    def with_specials(n):
        doc = torch.cat([random_docs([n], 60, low=3)[0], specials])
        return doc[torch.randperm(doc.numel())]

    full = [with_specials(limit), with_specials(limit - 1)]
    got, warned = _truncation_warnings(Engine(model), full)
    assert warned == []
    assert (got.double() - torch.stack([oracle(model, d) for d in full])).abs().max() <= 1e-4

    over = [with_specials(limit), with_specials(limit + 1)]
    got, warned = _truncation_warnings(Engine(model), over)
    assert len(warned) == 1 and "documents [1]" in warned[0]
    assert (got.double() - torch.stack([oracle(model, d) for d in over])).abs().max() <= 1e-4


def test_plan_reports_the_attention_each_layer_ran():
    model = tiny_model()
    engine = Engine(model, attention="sdpa")
    assert engine.plan.attention_report == [{}, {}]            # nothing ran yet
    engine.classify(random_docs([40], 60, low=3), batch_size=1)   # 40 tokens: one full segment, one padded
    assert engine.plan.attention_report == [{"unmasked": "sdpa", "masked": "sdpa"}] * 2
    report = engine.describe()
    assert report["attention"] == engine.plan.attention_report and report["attention_requested"] == "sdpa"
    assert report["dtype"] == "float32" and report["cuda_graphs"].startswith("off")
    assert report["packed_weights"] == engine.plan.packed_weights_status
