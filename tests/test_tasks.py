"""Task generators: exact segment counts, facts intact and unique, question last, determinism, splits."""
import gzip
from pathlib import Path

import pytest
import torch

from rmt_fast import segmentation
from rmt_fast.config import RMTConfig
from rmt_fast import tasks as T

BERT_CASED = Path(__file__).resolve().parents[1] / "rmt_fast" / "data" / "bert-base-cased"


@pytest.fixture(scope="module")
def tok():
    return T.load_tokenizer(BERT_CASED)


def _config(tok, input_size):
    return T.task_config(RMTConfig(vocab_size=len(tok), input_size=input_size))


def _find(hay: torch.Tensor, needle) -> list:
    h, n = hay.tolist(), list(needle)
    return [i for i in range(len(h) - len(n) + 1) if h[i:i + len(n)] == n]


def test_tokenizer_casing(tok):
    assert not tok.do_lower_case
    assert tok("Mary", add_special_tokens=False)["input_ids"] != tok("mary", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("task", T.TASKS)
@pytest.mark.parametrize("input_size,n_segments", [(64, 1), (64, 2), (64, 7), (512, 1), (512, 3), (40, 33)])
def test_exact_segments_fact_once_question_last(tok, task, input_size, n_segments):
    cfg = _config(tok, input_size)
    gen = T.TaskGenerator(task, tok, cfg, split="validation", seed=3)
    for i in range(4):
        s = gen.sample(n_segments, i)
        ids = s.input_ids
        assert ids.dtype == torch.int64 and ids.numel() == n_segments * cfg.segment_size
        assert not torch.isin(ids, torch.tensor(cfg.special_token_ids)).any()
        segs = segmentation.cut(segmentation.clean_and_truncate([ids], cfg), cfg)
        assert len(segs) == n_segments and bool((segs.length == cfg.segment_size).all())
        # The question ends the document; each fact is present exactly once, intact, at its span.
        q = tok(s.question, add_special_tokens=False)["input_ids"]
        assert s.question_span == (ids.numel() - len(q), ids.numel())
        assert ids[s.question_span[0]:].tolist() == q
        assert len(s.fact_spans) == (2 if task == "reasoning" else 1)
        for fact, (a, b) in zip(s.facts, s.fact_spans):
            f = tok(fact, add_special_tokens=False)["input_ids"]
            assert ids[a:b].tolist() == f
            assert _find(ids, f) == [a]
        if task == "memorize":
            assert s.fact_spans[0][0] == 0
        assert 0 <= s.label < len(T.LABEL_NAMES) and s.answer in " ".join(s.facts)


def test_facts_at_sentence_boundaries_and_text_reads_back(tok):
    cfg = _config(tok, 64)
    gen = T.TaskGenerator("detect", tok, cfg, split="test", seed=0)
    for i in range(10):
        s = gen.sample(5, i)
        text = tok.decode(s.input_ids)
        fact = s.facts[0]
        # Decoding keeps the fact as a whole sentence: preceded by a sentence end (or the start).
        at = text.index(fact)
        assert at == 0 or text[:at].rstrip()[-1] in ".!?\"'", text[max(0, at - 40):at + len(fact)]
        assert text.endswith(s.question)
        # The background's cut ends on a word boundary: the question starts a new word.
        a = s.question_span[0]
        assert not tok.convert_ids_to_tokens([int(s.input_ids[a])])[0].startswith("##")


def test_reasoning_answers_follow_from_facts(tok):
    gen = T.TaskGenerator("reasoning", tok, _config(tok, 128), split="validation", seed=1)
    for i in range(30):
        s = gen.sample(2, i)
        rel = {}
        for f in s.facts:
            w = f.rstrip(".").split()  # The A is D of the B
            rel[(w[3], w[6])] = w[1]
        q = s.question.rstrip("?").split()
        if q[2] == "the":   # What is the B D' of  -> the X with X D B, D = opposite(D')
            b, d = q[3], T.OPPOSITE[q[4]]
        else:               # What is D of the B
            d, b = q[2], q[5]
        assert rel[(d, b)] == s.answer


def test_deterministic_and_seed_dependent(tok):
    cfg = _config(tok, 64)
    a = T.TaskGenerator(("memorize", "detect"), tok, cfg, split="train", seed=5)
    b = T.TaskGenerator(("memorize", "detect"), tok, cfg, split="train", seed=5)
    c = T.TaskGenerator(("memorize", "detect"), tok, cfg, split="train", seed=6)
    for i in (0, 1, 17):
        sa, sb = a.sample(3, i), b.sample(3, i)
        assert torch.equal(sa.input_ids, sb.input_ids) and sa.label == sb.label and sa.fact_spans == sb.fact_spans
    assert any(not torch.equal(a.sample(3, i).input_ids, c.sample(3, i).input_ids) for i in range(3))
    assert a.batch(2, [4, 9])[1].tolist() == [a.sample(2, 4).label, a.sample(2, 9).label]


def test_splits_use_disjoint_novels(tok):
    novels = [n for ns in T.SPLITS.values() for n in ns]
    assert len(novels) == len(set(novels)) and set(T.KINDS["novel"]) <= set(novels)
    cfg = _config(tok, 64)
    sents = {}
    for split in T.SPLITS:
        c = T._corpus(split, tok)
        sents[split] = {tuple(c.tokens[s:s + n]) for s, n in zip(c.start[:2000], c.length[:2000]) if n > 12}
    assert not sents["train"] & sents["test"] and not sents["validation"] & sents["test"]
    assert not sents["train"] & sents["validation"]
    # And the background of a test sample comes from the test split's texts.
    s = T.TaskGenerator("memorize", tok, cfg, split="test", seed=0).sample(2, 0)
    a, b = s.fact_spans[0][1], s.question_span[0]
    bg = tok.decode(s.input_ids[a:b][:12])
    test_text = ""
    for source in T.SPLITS["test"]:
        with gzip.open(T.noise_dir() / f"{source}.txt.gz", "rt", encoding="utf-8") as f:
            test_text += " " + " ".join(f.read().split())
    assert " ".join(bg.split()[:4]) in tok.decode(tok(test_text, add_special_tokens=False)["input_ids"])


def test_labels_cover_all_places(tok):
    gen = T.TaskGenerator("detect", tok, _config(tok, 64), split="train", seed=0)
    labels = [gen.sample(1, i).label for i in range(120)]
    assert set(labels) == set(range(6))
    assert T.LABEL_NAMES == ("bathroom", "hallway", "garden", "office", "bedroom", "kitchen")


def test_rejects_bad_arguments(tok):
    with pytest.raises(ValueError, match="unknown task"):
        T.TaskGenerator("nope", tok, _config(tok, 64))
    with pytest.raises(ValueError, match="unknown split"):
        T.TaskGenerator("memorize", tok, _config(tok, 64), split="dev")
    with pytest.raises(ValueError, match="too small"):
        T.TaskGenerator("reasoning", tok, _config(tok, 24))
    with pytest.raises(ValueError, match="n_segments"):
        T.TaskGenerator("memorize", tok, _config(tok, 64)).sample(0, 0)


def test_long_sample_is_fast_and_exact(tok):
    cfg = _config(tok, 512)
    s = T.TaskGenerator("detect", tok, cfg, split="test", seed=0).sample(300, 0)  # 149,700 tokens > the novel
    assert s.input_ids.numel() == 300 * cfg.segment_size
