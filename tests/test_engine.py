"""The Engine against the oracle: float32 logits within 1e-4, at segment boundaries, every alignment."""
import copy
import os

import pytest
import torch

from helpers import bert_base_cased_config, make_model, oracle, random_docs, tiny_model
from rmt_fast import Engine, InvalidDocumentsError

BOUNDARY_LENGTHS = [1, 2, 498, 499, 500, 997, 998, 999, 4990]


@pytest.fixture(scope="module")
def bert2():
    """A 2-layer model of bert-base-cased's shape (hidden 768, 12 heads, vocab 28996 + 10 memory rows)."""
    torch.manual_seed(1234)
    return make_model(bert_base_cased_config(num_layers=2), num_mem_tokens=10, input_size=512)


@pytest.mark.parametrize("alignment", ["right", "left", "center"])
def test_engine_matches_oracle_at_segment_boundaries(bert2, alignment):
    model = copy.copy(bert2)  # shares the weights; only the alignment differs
    model.config = bert2.config.replace(segment_alignment=alignment)
    docs = random_docs(BOUNDARY_LENGTHS, bert2.config.vocab_size)
    want = torch.stack([oracle(model, d, alignment=alignment) for d in docs])
    got = Engine(model).classify(docs, batch_size=4)           # one batch mixing every length
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got.double() - want).abs().max() <= 1e-4
    assert want.std(0).max() > 1e-2, "logits barely depend on the input: the comparison would be vacuous"


@pytest.mark.parametrize("attention", ["sdpa", "matmul"])
def test_every_attention_backend_matches_oracle(bert2, attention):
    docs = random_docs([7, 620], bert2.config.vocab_size)
    want = torch.stack([oracle(bert2, d) for d in docs])
    got = Engine(bert2, attention=attention).classify(docs, batch_size=2)
    assert (got.double() - want).abs().max() <= 1e-4


def test_memory_carries_information_across_segments(bert2):
    """Changing only the first segment must change the last segment's logits."""
    doc = random_docs([1200], bert2.config.vocab_size)[0]
    other = doc.clone()
    other[:100] = torch.randint(103, bert2.config.vocab_size, (100,))
    a, b = Engine(bert2).classify([doc, other], batch_size=2)
    assert (a - b).abs().max() > 1e-3


def test_batch_invariance_and_slot_reuse():
    model = tiny_model()
    docs = random_docs([5, 90, 1, 18, 19, 37, 200, 3, 18 * 7], 60, low=3)
    alone = torch.stack([Engine(model).classify([d])[0] for d in docs])
    for batch_size in (2, 3, 16):
        together = Engine(model).classify(docs, batch_size=batch_size)
        assert (together - alone).abs().max() <= 1e-5
    want = torch.stack([oracle(model, d) for d in docs])
    assert (alone.double() - want).abs().max() <= 1e-4


def test_max_n_segments_truncation_keeps_head():
    model = tiny_model(max_n_segments=2)
    docs = random_docs([100, 36, 37], 60, low=3)
    with pytest.warns(UserWarning, match="max_n_segments"):
        got = Engine(model).classify(docs, batch_size=2)
    want = torch.stack([oracle(model, d) for d in docs])
    assert (got.double() - want).abs().max() <= 1e-4


def test_float64_oracle_agrees(bert2):
    doc = random_docs([530], bert2.config.vocab_size)[0]
    want = oracle(bert2, doc, dtype=torch.float64)
    got = Engine(bert2).classify([doc])[0]
    assert (got.double() - want).abs().max() <= 1e-4


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_low_precision_against_float32(bert2, dtype, tol):
    """Stated tolerance: max abs logit difference to float32 <= tol (logits here have std ~1.3; measured 0.016 and 0.0023)."""
    docs = random_docs([10, 998, 1600], bert2.config.vocab_size)
    ref = Engine(bert2).classify(docs, batch_size=3)
    got = Engine(bert2, dtype=dtype).classify(docs, batch_size=3)
    assert torch.isfinite(got).all()
    assert (got - ref).abs().max() <= tol
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_empty_documents():
    model = tiny_model()
    docs = [torch.tensor([5, 6, 7]), torch.tensor([0, 1, 2, 0]), torch.tensor([], dtype=torch.int64)]
    with pytest.raises(InvalidDocumentsError) as e:
        Engine(model).classify(docs)
    assert set(e.value.problems) == {1, 2} and "empty" in str(e.value)
    got = Engine(model).classify(docs, empty="special")
    want = torch.stack([oracle(model, d, empty_as_special=True) for d in docs])
    assert (got.double() - want).abs().max() <= 1e-4


@pytest.mark.parametrize("doc,message", [
    (torch.tensor([5, 60, 7]), "collides with the memory-token ids"),
    (torch.tensor([5, 63]), "outside the vocabulary"),
    (torch.tensor([5, -1]), "outside the vocabulary"),
    (torch.tensor([5.0, 6.0]), "must be integers"),
    (torch.tensor([True, False]), "must be integers"),
    (torch.tensor([[5, 6]]), "1-D"),
    ([5, "a"], "Python ints"),
])
def test_bad_documents_are_named(doc, message):
    model = tiny_model()
    with pytest.raises(InvalidDocumentsError, match=message) as e:
        Engine(model).classify([torch.tensor([4, 5]), doc])
    assert list(e.value.problems) == [1]


def test_missing_device_and_bad_options():
    model = tiny_model()
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            Engine(model, device="cuda")
    with pytest.raises(ValueError, match="dtype"):
        Engine(model, dtype="int8")
    with pytest.raises(ValueError, match="batch_size"):
        Engine(model).classify([[5]], batch_size=0)
    with pytest.raises(RuntimeError, match="unknown attention backend"):
        Engine(model, attention="nope").classify([[5]])


def test_engine_with_triton_attention_matches_oracle():
    """The fused Triton kernel (under TRITON_INTERPRET=1 on a CPU) inside the whole Engine."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":  # compiled Triton takes CUDA tensors only
        pytest.skip("CPU tensors need Triton's interpreter; tests/test_gpu_engine.py runs the kernel on the GPU")
    from transformers import BertConfig
    bc = BertConfig(vocab_size=60, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=96, max_position_embeddings=64, initializer_range=0.2)
    model = make_model(bc, num_mem_tokens=3, input_size=24, cls_token_id=1, sep_token_id=2, pad_token_id=0)
    docs = random_docs([1, 18, 19, 40], 60, low=3)
    got = Engine(model, attention="triton").classify(docs, batch_size=3)
    want = torch.stack([oracle(model, d) for d in docs])
    assert (got.double() - want).abs().max() <= 1e-4


def test_explicit_triton_without_gpu_or_interpreter_fails_loudly():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    import os
    import subprocess
    import sys
    code = ("import sys; sys.path.insert(0, 'tests'); from helpers import make_model; from rmt_fast import Engine\n"
            "from transformers import BertConfig\n"
            "bc = BertConfig(vocab_size=60, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,"
            " intermediate_size=64, max_position_embeddings=64)\n"  # head_dim 32: the kernel supports it
            "m = make_model(bc, num_mem_tokens=3, input_size=24, cls_token_id=1, sep_token_id=2, pad_token_id=0)\n"
            "try:\n    Engine(m, attention='triton').classify([[5, 6, 7]])\n"
            "except RuntimeError as e:\n    print('ERR', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert "ERR attention backend 'triton' cannot run here" in res.stdout, res.stdout + res.stderr
    assert "GPU" in res.stdout or "TRITON_INTERPRET" in res.stdout, res.stdout
    # ... while 'auto' quietly takes another backend.
    res = subprocess.run([sys.executable, "-c", code.replace("attention='triton'", "attention='auto'")],
                         capture_output=True, text=True, env=env, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0 and "ERR" not in res.stdout, res.stdout + res.stderr


def test_engine_same_with_and_without_the_extension(tmp_path):
    """Without rmt_fast._C (a fresh process where it cannot be imported): every op is its torch twin and
    the cpp attention backend is unavailable."""
    import os
    import subprocess
    import sys
    from rmt_fast import _ext
    if not _ext.available():
        pytest.skip(f"extension not built: {_ext.why_unavailable()}")
    model = tiny_model()
    docs = random_docs([1, 40, 19], 60, low=3)
    with_ext = Engine(model).classify(docs, batch_size=2)
    torch.save({"weights": model.state_dict(), "docs": docs}, tmp_path / "case.pt")
    code = ("import sys, torch; sys.modules['rmt_fast._C'] = None\n"
            "from helpers import tiny_model\n"
            "from rmt_fast import Engine, _ext\n"
            "assert not _ext.available() and _ext.attention_why_unavailable() is not None\n"
            f"case = torch.load({str(tmp_path / 'case.pt')!r}, weights_only=True)\n"
            "model = tiny_model()\n"
            "model.load_state_dict(case['weights'])\n"
            "engine = Engine(model)\n"
            "out = engine.classify(case['docs'], batch_size=2)\n"
            "assert 'cpp' not in engine.plan._chosen.values(), engine.plan._chosen\n"
            f"torch.save(out, {str(tmp_path / 'out.pt')!r})\n")
    tests = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])))
    assert run.returncode == 0, run.stderr[-3000:]
    without = torch.load(tmp_path / "out.pt", weights_only=True)
    assert (with_ext - without).abs().max() <= 1e-5
    want = torch.stack([oracle(model, d) for d in docs])
    assert (without.double() - want).abs().max() <= 1e-4
