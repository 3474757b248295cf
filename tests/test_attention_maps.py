"""Attention maps on a tiny random model: shapes, probabilities, marks, the summary, bounded memory."""
import argparse
import json

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from rmt_fast import RMTConfig, RMTForSequenceClassification
from rmt_fast.analysis import attention_maps_cli as am
from rmt_fast.analysis.attention_maps import (BACKGROUND, CLS, FACT, MEMORY, PAD, QUESTION, SEP,
                                              attention_maps, find_token_spans, memory_attention_summary)

M, INPUT, V = 3, 24, 100
S = INPUT - M - 3  # 18 text tokens per segment
CFG = RMTConfig(vocab_size=V, num_mem_tokens=M, input_size=INPUT, num_labels=6, cls_token_id=1,
                sep_token_id=2, pad_token_id=0)
BCFG = BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=INPUT)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return RMTForSequenceClassification.from_configs(CFG, BCFG).eval()


def doc(n, lo=5):
    return torch.randint(lo, V, (n,))


def test_shapes_and_selection(model):
    d = doc(60)  # 6 + 18 + 18 + 18 tokens: right alignment puts the remainder first
    r = attention_maps(model, d, segments="all")
    assert r.n_segments == 4 and [s.segment for s in r.segments] == [0, 1, 2, 3]
    assert [tuple(s.attention.shape) for s in r.segments] == [(1, 1, 12, 12)] + [(1, 1, INPUT, INPUT)] * 3
    assert r.layers == [0, 1] and r.heads == [0, 1, 2, 3]
    r = attention_maps(model, d, layers=[-1], heads=[3, 1], segments=[-1, 1], mean=False)
    assert [s.segment for s in r.segments] == [1, 3]
    assert r.layers == [1] and r.heads == [3, 1]
    assert r.segments[0].attention.shape == (1, 2, INPUT, INPUT)
    with pytest.raises(ValueError, match="segment 4 is out of range"):
        attention_maps(model, d, segments=[4])
    with pytest.raises(ValueError, match="head 4"):
        attention_maps(model, d, heads=[4])


def test_maps_are_the_backbones_probabilities(model):
    d = doc(30)
    r = attention_maps(model, d, segments="all", mean=False)
    for s in r.segments:
        a = s.attention
        assert torch.isfinite(a).all() and (a >= 0).all()
        # PAD keys are cropped away without losing mass: every row still sums to one
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]), atol=1e-5, rtol=0)
    mean = attention_maps(model, d, segments="all")
    torch.testing.assert_close(mean.segments[1].attention[0, 0], r.segments[1].attention.mean((0, 1)))


def test_carries_memory_like_the_model(model):
    d = doc(80)
    r = attention_maps(model, d, segments=[1, -1])
    assert r.last_segment_run == r.n_segments - 1
    torch.testing.assert_close(r.logits, model(d[None]).logits[0], atol=1e-5, rtol=0)


def test_marks_follow_tokens_through_cleaning_and_segmentation(model):
    raw = torch.arange(10, 10 + 50)
    raw[[3, 20]] = CFG.sep_token_id  # removed before cutting: later indices shift by one, then two
    facts, question = [(12, 25)], [(45, 50)]
    r = attention_maps(model, raw, fact_spans=facts, question_spans=question, segments="all")
    kept_len = 48
    assert r.n_segments == 3 and sum(int((s.labels >= BACKGROUND).sum()) for s in r.segments) == kept_len
    want_fact = [int(t) for t in raw[12:25] if t != CFG.sep_token_id]
    got_fact = torch.cat([s.ids[s.labels == FACT] for s in r.segments]).tolist()
    assert got_fact == want_fact
    assert torch.cat([s.ids[s.labels == QUESTION] for s in r.segments]).tolist() == raw[45:50].tolist()
    for s in r.segments:
        T = s.ids.numel()
        assert s.labels[0] == CLS and (s.labels[1:M + 1] == MEMORY).all()
        assert s.labels[M + 1] == SEP and s.labels[T - 1] == SEP and not (s.labels == PAD).any()
        text = s.doc_positions >= 0
        assert (s.ids[text] == raw[s.doc_positions[text]]).all()
        assert (s.doc_positions[~text] == -1).all() and not text[:M + 2].any()
    # the fact crosses the boundary of the first two segments (12 + 18 + 18 kept tokens)
    assert [s.positions(FACT) for s in r.segments][:2] == [[M + 2 + 11], [M + 2 + i for i in range(11)]]
    auto = attention_maps(model, raw, fact_spans=facts, question_spans=question)
    assert [s.segment for s in auto.segments] == [0, 1, 2]
    assert [s.segment for s in attention_maps(model, doc(100), fact_spans=[(40, 42)]).segments] == [0, 2, 5]
    with pytest.raises(ValueError, match="fact span"):
        attention_maps(model, raw, fact_spans=[(40, 51)])


def test_summary_on_hand_set_probabilities():
    labels = torch.tensor([CLS, MEMORY, MEMORY, SEP, FACT, BACKGROUND, QUESTION, SEP, PAD])
    p = torch.zeros(9, 9)
    p[1] = torch.tensor([0.1, 0.2, 0.0, 0.1, 0.4, 0.2, 0.0, 0.0, 0.0])
    p[2] = torch.tensor([0.0, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    p[6] = torch.tensor([0.0, 0.3, 0.3, 0.0, 0.0, 0.0, 0.4, 0.0, 0.0])
    s = memory_attention_summary(p, labels)
    want = {"fact": 0.2, "memory": 0.6, "cls_sep": 0.1, "question": 0.0, "background": 0.1}
    assert s["memory_rows"] == pytest.approx(want)
    assert sum(s["memory_rows"].values()) == pytest.approx(1.0)
    assert s["uniform"] == pytest.approx({"fact": 1 / 8, "memory": 2 / 8, "cls_sep": 3 / 8,
                                          "question": 1 / 8, "background": 1 / 8})
    assert s["question_to_memory"] == pytest.approx(0.6)
    assert s["counts"] == {"cls": 1, "memory": 2, "sep": 2, "background": 1, "fact": 1, "question": 1}
    # leading (layer, head) dims are averaged first
    q = torch.zeros(9, 9)
    q[1, 4] = q[2, 4] = 1.0
    s2 = memory_attention_summary(torch.stack([p, q])[:, None], labels)
    assert s2["memory_rows"]["fact"] == pytest.approx((0.2 + 1.0) / 2)
    p[6] = 0
    assert memory_attention_summary(p, labels)["question_to_memory"] == 0.0
    assert memory_attention_summary(p, labels.masked_fill(labels == QUESTION, BACKGROUND))["question_to_memory"] is None


def test_only_requested_segments_are_kept(model, monkeypatch):
    calls = []
    step = model.segment_step

    def counting(ids, memory, output_attentions=False):
        calls.append(output_attentions)
        return step(ids, memory, output_attentions=output_attentions)

    monkeypatch.setattr(model, "segment_step", counting)
    r = attention_maps(model, doc(40 * S), segments=[2, 5])
    assert r.n_segments == 40 and [s.segment for s in r.segments] == [2, 5]
    # attentions were requested on those two steps only, and the run stopped after the last of them
    assert calls == [False, False, True, False, False, True]
    assert r.last_segment_run == 5


def test_switches_to_eager_and_back():
    bconf = BertConfig(**{**BCFG.to_dict(), "vocab_size": V + M, "num_labels": 6})
    backbone = BertForSequenceClassification(bconf)
    backbone.set_attn_implementation("sdpa")
    m = RMTForSequenceClassification(CFG, backbone).train()
    r = attention_maps(m, doc(20), segments="all")
    assert len(r.segments) == 2
    assert m.model.config._attn_implementation == "sdpa" and m.training


def test_find_token_spans():
    assert find_token_spans([1, 2, 3, 1, 2, 3], [2, 3]) == [(1, 3), (4, 6)]
    assert find_token_spans([1, 2], [1, 2, 3]) == [] and find_token_spans([1], []) == []


def test_cli_on_text_with_fact_and_question(tmp_path, capsys):
    from rmt_fast.checkpoints import save_pretrained

    torch.manual_seed(0)
    cfg = RMTConfig(vocab_size=28996, num_mem_tokens=M, input_size=INPUT, num_labels=6)
    bert = BertConfig(**{**BCFG.to_dict(), "vocab_size": 28996})
    save_pretrained(RMTForSequenceClassification.from_configs(cfg, bert), tmp_path / "model")
    text = ("Daniel went back to the garden. It was a fine morning and the house was quiet. " * 2 +
            "Where is Daniel?")
    (tmp_path / "doc.txt").write_text(text)
    parser = argparse.ArgumentParser()
    am.add_cli(parser.add_subparsers())
    args = parser.parse_args(["attention-maps", "--model", str(tmp_path / "model"), "--input",
                              str(tmp_path / "doc.txt"), "--fact-text", "Daniel went back to the garden.",
                              "--question-text", "Where is Daniel?", "--layers", "-1", "--segments", "all",
                              "--out", str(tmp_path / "out"), "--save-maps", "--quiet"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "| segment |" in out and "mem->fact" in out
    data = json.loads((tmp_path / "out" / "attention_summary.json").read_text())
    assert data["layers"] == [1] and data["mean"] and data["kept_segments"] == list(range(data["n_segments"]))
    counts = [s["summary"]["counts"] for s in data["segments"]]
    assert sum(c["fact"] for c in counts) == 2 * 7  # two occurrences of the 7-token fact
    assert sum(c["question"] for c in counts) == 4
    assert (tmp_path / "out" / "attention_maps.png").stat().st_size > 5_000
    saved = torch.load(tmp_path / "out" / "attention_maps.pt", weights_only=True)
    assert len(saved["segments"]) == data["n_segments"]
    bad = parser.parse_args(["attention-maps", "--model", str(tmp_path / "model"), "--input",
                             str(tmp_path / "doc.txt"), "--fact-text", "not in it", "--out", str(tmp_path)])
    assert bad.func(bad) == 2


def test_cli_task_sample_marks_its_spans(tmp_path, monkeypatch, capsys):
    """--task takes the document and its spans from rmt_fast.tasks (stubbed: its corpus is slow to build)."""
    from types import SimpleNamespace

    from rmt_fast.checkpoints import save_pretrained

    save_pretrained(RMTForSequenceClassification.from_configs(CFG, BCFG), tmp_path / "model")
    ids = torch.randint(5, V, (2 * S,))
    sample = SimpleNamespace(input_ids=ids, fact_spans=((0, 4),), question_span=(2 * S - 3, 2 * S), label=2,
                             n_segments=2, task="memorize", facts=("Mary went to the garden.",),
                             question="Where is Mary?", answer="garden")
    seen = {}

    class Generator:
        def __init__(self, task, tokenizer, config, split, seed):
            seen.update(task=task, split=split, seed=seed, segment_size=config.segment_size)

        def sample(self, n_segments, index):
            seen.update(n_segments=n_segments, index=index)
            return sample

    monkeypatch.setattr(am.tasks, "TaskGenerator", Generator)
    monkeypatch.setattr(am.tasks, "load_tokenizer", lambda path: None)
    parser = argparse.ArgumentParser()
    am.add_cli(parser.add_subparsers())
    args = parser.parse_args(["attention-maps", "--model", str(tmp_path / "model"), "--task-segments", "2",
                              "--task-index", "5", "--out", str(tmp_path / "out"), "--no-plot", "--quiet"])
    assert args.func(args) == 0
    assert seen == {"task": "memorize", "split": "test", "seed": 0, "segment_size": S, "n_segments": 2,
                    "index": 5}
    assert "answer garden" in capsys.readouterr().out
    data = json.loads((tmp_path / "out" / "attention_summary.json").read_text())
    assert data["task"]["question"] == "Where is Mary?" and data["kept_segments"] == [0, 1]
    assert [s["marks"]["fact"] for s in data["segments"]] == [[[M + 2, M + 6]], []]
    assert [s["marks"]["question"] for s in data["segments"]] == [[], [[M + 2 + S - 3, M + 2 + S]]]


@pytest.mark.parametrize("max_n_segments", [None, 2])
def test_segmentation_returns_kept_positions(max_n_segments):
    """clean_and_truncate(keep_positions=True): where each kept token was in its document as given."""
    from rmt_fast import segmentation

    cfg = CFG.replace(max_n_segments=max_n_segments)
    special = set(cfg.special_token_ids)
    # the first has no special id; the second is cut when max_n_segments is set
    docs = [torch.arange(10, 70)] + [torch.randint(0, 8, (n,)) for n in (80, 1, 0, 7)]
    for got_docs in ([d] for d in docs), [docs]:
        for batch in got_docs:
            out = segmentation.clean_and_truncate(batch, cfg, keep_positions=True)
            for k, d in enumerate(batch):
                want = [i for i, t in enumerate(d.tolist()) if t not in special]
                if max_n_segments is not None:
                    want = want[:cfg.segment_size * max_n_segments]
                a, n = int(out.starts[k]), int(out.lengths[k])
                assert out.positions[a:a + n].tolist() == want
                assert out.tokens[a:a + n].tolist() == [d.tolist()[i] for i in want]
    assert segmentation.clean_and_truncate(docs, cfg).positions is None
