"""Threads sharing one Engine get the logits of sequential calls (issue 10, item 1).

Each thread runs its own mix of ``classify`` (different documents and batch sizes) and ``classify_texts``
calls, all started together, several times over; every result must equal the same call made alone.
"""
import threading

import pytest
import torch
from transformers import BertConfig

from helpers import make_model, random_docs
from rmt_fast import Engine

THREADS, REPEATS = 3, 4
WORDS = "the memory carries what each segment read before and the classifier reads it at the end".split()


@pytest.fixture(scope="module")
def text_model():
    """A small BERT over bert-base-cased's vocabulary, so that texts can be classified too."""
    bc = BertConfig(vocab_size=28996, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=64, initializer_range=0.2)
    return make_model(bc, num_mem_tokens=4, input_size=40)


def _calls(model, tokenizer):
    """One list of calls per thread: each thread its own documents, the same mix of entry points and
    batch sizes (so that calls of one shape run at the same time), the lengths of the documents mixed."""
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))

    def texts(n):
        return [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(k),), generator=g))
                for k in torch.randint(1, 150, (n,), generator=g)]

    def lengths(n):
        return [int(k) for k in torch.randint(1, 200, (n,), generator=g)]

    return [[lambda e, d=random_docs(lengths(5), V): e.classify(d, batch_size=2),
             lambda e, t=texts(4): e.classify_texts(t, tokenizer, batch_size=3, chunk_chars=64),
             lambda e, d=random_docs(lengths(3), V): e.classify(d, batch_size=3)]
            for _ in range(THREADS)]


@pytest.mark.parametrize("loop", ["compact", "static"])
def test_threads_sharing_an_engine_get_sequential_logits(text_model, tokenizer, loop):
    engine = Engine(text_model)
    engine.static_loop = loop == "static"      # the all-slot loop CUDA runs (shared runners), on the CPU
    per_thread = _calls(text_model, tokenizer)
    want = [[call(engine) for call in calls] for calls in per_thread]   # sequential, one call at a time
    assert want[0][0].std(0).max() > 1e-2, "logits barely depend on the input: the comparison would be vacuous"

    got = [[] for _ in range(THREADS)]
    errors = []
    start = threading.Barrier(THREADS)

    def work(t):
        try:
            start.wait()
            for r in range(REPEATS):
                order = list(range(len(per_thread[t])))
                if r % 2:
                    order.reverse()            # odd repetitions run the calls in the other order
                results = {c: per_thread[t][c](engine) for c in order}
                got[t].append([results[c] for c in sorted(results)])
        except BaseException as e:  # noqa: BLE001 - reported below with the thread's number
            errors.append((t, e))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not any(th.is_alive() for th in threads), "a thread hung"
    assert not errors, errors
    for t in range(THREADS):
        assert len(got[t]) == REPEATS
        for r, results in enumerate(got[t]):
            for c, (a, b) in enumerate(zip(results, want[t])):
                diff = (a - b).abs().max().item()
                assert diff <= 1e-6, f"thread {t}, repetition {r}, call {c}: logits differ by {diff}"
