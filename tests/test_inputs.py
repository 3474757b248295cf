"""Token ids of every integer dtype, checked exactly (issue 10, item 2): a narrow dtype must not wrap the
vocabulary bound, an unsigned 64-bit one must not fail inside torch, a huge Python int must be named."""
import numpy as np
import pytest
import torch

from helpers import random_docs, tiny_model
from rmt_fast import Engine, InvalidDocumentsError, RMTConfig
from rmt_fast.inputs import as_documents

BIG_VOCAB = RMTConfig(vocab_size=28996, num_labels=2)       # a bound no 8-bit dtype can hold
TORCH_INTS = [torch.int8, torch.uint8, torch.int16, torch.uint16, torch.int32, torch.uint32, torch.int64,
              torch.uint64]
NUMPY_INTS = [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64]


def _ids(dtype, values):
    if isinstance(dtype, torch.dtype):
        return torch.tensor(values, dtype=torch.int64).to(dtype)
    return np.array(values, dtype=dtype)


@pytest.mark.parametrize("dtype", TORCH_INTS + NUMPY_INTS, ids=str)
def test_every_integer_dtype_is_accepted_and_kept_exactly(dtype):
    values = [100, 5, 127, 0]                                # valid ids that every dtype can hold
    docs = as_documents([_ids(dtype, values), _ids(dtype, values[:2])], BIG_VOCAB)
    assert [d.dtype for d in docs] == [torch.int64] * 2
    assert docs[0].tolist() == values and docs[1].tolist() == values[:2]


@pytest.mark.parametrize("dtype", [torch.int8, np.int8, torch.int16, np.int32], ids=str)
def test_negative_ids_of_narrow_signed_dtypes_are_named(dtype):
    with pytest.raises(InvalidDocumentsError, match=r"id -3 at position 1 is outside the vocabulary \[0, 28996\)"):
        as_documents([_ids(dtype, [5, -3])], BIG_VOCAB)


@pytest.mark.parametrize("doc,value", [
    (np.array([5, 2**63 + 5], dtype=np.uint64), 2**63 + 5),      # would wrap negative in int64
    (torch.tensor([5, 2**63 + 5], dtype=torch.uint64), 2**63 + 5),
    ([5, 2**70], 2**70),                                        # beyond any integer dtype
    (np.array([5, 40000], dtype=np.uint16), 40000),
])
def test_ids_beyond_the_vocabulary_are_named_with_their_exact_value(doc, value):
    with pytest.raises(InvalidDocumentsError) as e:
        as_documents([doc], BIG_VOCAB)
    assert e.value.problems == {0: f"id {value} at position 1 is outside the vocabulary [0, 28996)"}


@pytest.mark.parametrize("doc", [np.array([1.0, 2.0]), np.array([True, False]), torch.tensor([1 + 2j])], ids=str)
def test_non_integer_dtypes_are_refused_by_name(doc):
    with pytest.raises(InvalidDocumentsError, match="token ids must be integers, got dtype"):
        as_documents([doc], BIG_VOCAB)


def test_engine_gives_the_same_logits_for_every_integer_dtype():
    model = tiny_model()
    docs = random_docs([5, 40, 19], 60, low=3)
    engine = Engine(model)
    want = engine.classify(docs, batch_size=2)
    for dtype in (torch.uint8, torch.int8, torch.uint64, np.uint16, np.int32):
        got = engine.classify([_ids(dtype, d.tolist()) for d in docs], batch_size=2)
        assert torch.equal(got, want), dtype
