"""The Reasoning generator (bAbI qa4): both facts present, the answer follows from them alone, labels
and answer positions balanced, deterministic by seed."""
from collections import Counter
from pathlib import Path

import pytest
import torch

from rmt_fast.config import RMTConfig
from rmt_fast import tasks as T

BERT_CASED = Path(__file__).resolve().parents[1] / "rmt_fast" / "data" / "bert-base-cased"


@pytest.fixture(scope="module")
def tok():
    return T.load_tokenizer(BERT_CASED)


@pytest.fixture(scope="module")
def gen(tok):
    return T.TaskGenerator("reasoning", tok, T.task_config(RMTConfig(vocab_size=len(tok), input_size=64)),
                           split="validation", seed=11)


def solve(facts, question) -> str:
    """The answer from the two facts and the question alone; raises if they do not determine one."""
    is_dir_of = {}                                    # (direction, b) -> a, from "The a is direction of the b."
    for f in facts:
        w = f.rstrip(".").split()
        assert w[0] == "The" and w[2] == "is" and w[3] in T.DIRECTIONS and w[4:6] == ["of", "the"], f
        is_dir_of.setdefault((w[3], w[6]), []).append(w[1])
    q = question.rstrip("?").split()
    if q[2] == "the":                                 # "What is the b d' of?": the x with "the b is d' of the x"
        b, d = q[3], T.OPPOSITE[q[4]]
    else:                                             # "What is d of the b?"
        d, b = q[2], q[5]
    (answer,) = is_dir_of[(d, b)]
    return answer


def test_both_facts_in_the_document_once_at_their_spans(tok, gen):
    for n_segments in (1, 2, 5):
        for i in range(12):
            s = gen.sample(n_segments, i)
            assert s.task == "reasoning" and len(s.facts) == 2 and len(s.fact_spans) == 2
            (a0, b0), (a1, b1) = s.fact_spans
            assert b0 <= a1 and b1 <= s.question_span[0]          # in order, apart, before the question
            ids = s.input_ids.tolist()
            for fact, (a, b) in zip(s.facts, s.fact_spans):
                want = tok(fact, add_special_tokens=False)["input_ids"]
                assert ids[a:b] == want
                hits = [j for j in range(len(ids) - len(want) + 1) if ids[j:j + len(want)] == want]
                assert hits == [a]


def test_answer_follows_from_the_facts_alone(tok, gen):
    forms = Counter()
    for i in range(200):
        s = gen.sample(2, i)
        assert solve(s.facts, s.question) == s.answer
        subjects = [f.split()[1] for f in s.facts]
        assert len(set(subjects)) == 2 and s.answer in subjects   # the other fact's place is not the answer
        forms["inverse" if s.question.split()[2] == "the" else "direct"] += 1
    assert min(forms.values()) >= 70, forms                       # both qa4 question forms, about half each


def test_no_place_or_person_outside_the_facts_and_question(tok, gen):
    """The background names none of the tasks' places or people: the facts are the only evidence."""
    for i in range(20):
        s = gen.sample(4, i)
        keep = torch.ones(s.input_ids.numel(), dtype=torch.bool)
        for a, b in s.fact_spans + (s.question_span,):
            keep[a:b] = False
        background = tok.decode(s.input_ids[keep])
        assert T._ENTITY.search(background) is None, background


def test_labels_and_answer_positions_balanced(gen):
    n = 600
    samples = [gen.sample(1, i) for i in range(n)]
    labels = Counter(s.label for s in samples)
    assert set(labels) == set(range(len(T.LABEL_NAMES)))
    assert all(0.6 * n / 6 <= c <= 1.4 * n / 6 for c in labels.values()), labels
    # Which fact answers, in document order: a model must not get away with "the first place named".
    first = sum(s.facts[0].split()[1] == s.answer for s in samples)
    assert 0.4 * n <= first <= 0.6 * n, first


def test_deterministic_by_seed_and_order_free(tok):
    cfg = T.task_config(RMTConfig(vocab_size=len(tok), input_size=64))
    a = T.TaskGenerator("reasoning", tok, cfg, split="train", seed=3)
    b = T.TaskGenerator("reasoning", tok, cfg, split="train", seed=3)
    c = T.TaskGenerator("reasoning", tok, cfg, split="train", seed=4)
    later = [b.sample(3, i) for i in (9, 2, 5)]                   # drawn in another order
    for s, i in zip(later, (9, 2, 5)):
        r = a.sample(3, i)
        assert torch.equal(r.input_ids, s.input_ids) and (r.label, r.facts, r.question, r.fact_spans) == \
            (s.label, s.facts, s.question, s.fact_spans)
    assert sum((a.sample(3, i).facts, a.sample(3, i).question) != (c.sample(3, i).facts, c.sample(3, i).question)
               for i in range(8)) >= 6
