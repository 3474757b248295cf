"""The Engine follows its source model (issue 20, item 1; issue 11): any change to the model's weights,
their dtype or device is noticed at the next call, which then equals a fresh Engine on the changed model;
the Engine itself never changes the model."""
import contextlib
import threading
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import BertConfig

from helpers import make_model, random_docs, tiny_model
from rmt_fast import Engine
from rmt_fast.engine import runner
from rmt_fast.tokenize import load_tokenizer

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "rmt_fast" / "data" / "bert-base-cased"

LENGTHS = [5, 70, 21, 44]
THREADS, ROUNDS = 3, 4


def _docs():
    return random_docs(LENGTHS, 60, low=3)


def _query(m):
    return m.model.bert.encoder.layer[0].attention.self.query.weight


def _sgd_step(m):
    """optimizer.step() on a loss of the plain forward, the model left in eval mode."""
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    m(random_docs([30, 9], 60, low=3), labels=torch.tensor([1, 4])).loss.backward()
    opt.step()


def _ema_swap(m):
    """The usual EMA swap: every parameter overwritten through ``.data`` (no version counter moves)."""
    for p in m.parameters():
        p.data.copy_(p.data + 0.05 * torch.randn_like(p))


def _load_backbone(m):
    other = tiny_model()
    m.model.load_state_dict(other.model.state_dict())


def _assign_state(m):
    state = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in m.state_dict().items()}
    m.load_state_dict(state, assign=True)


def _replace_classifier(m):
    m.model.classifier = nn.Linear(m.model.classifier.in_features, m.model.classifier.out_features)


def _add(tensor_of, scale=0.1):
    """An in-place add of noise (not of a constant: LayerNorm would cancel that on some weights)."""
    def mutate(m):
        with torch.no_grad():
            t = tensor_of(m)
            t.add_(scale * torch.randn_like(t))
    return mutate


def _set_data(m):
    q = _query(m)
    q.data = q.data + 0.1 * torch.randn_like(q)


MUTATIONS = {
    "optimizer.step": _sgd_step,
    "add_ on a fused query weight": _add(_query),
    "add_ on the memory rows (a view)": _add(lambda m: m.model.bert.embeddings.word_embeddings.weight[60:]),
    "add_ on an FFN weight": _add(lambda m: m.model.bert.encoder.layer[1].intermediate.dense.weight),
    "EMA swap with p.data.copy_": _ema_swap,
    "backbone load_state_dict": _load_backbone,
    "load_state_dict(assign=True)": _assign_state,
    "p.data = other": _set_data,
    "submodule replaced": _replace_classifier,
    "half()": lambda m: m.half(),
    "to(bfloat16)": lambda m: m.to(torch.bfloat16),
    "config replaced": lambda m: setattr(m, "config", m.config.replace(max_n_segments=2)),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_a_changed_model_gives_a_fresh_engines_logits(mutation):
    model = tiny_model()
    docs = _docs()
    engine = Engine(model)
    before = engine.classify(docs, batch_size=3)
    with pytest.warns(UserWarning) if mutation == "config replaced" else contextlib.nullcontext():
        MUTATIONS[mutation](model)
        got = engine.classify(docs, batch_size=3)
        want = Engine(model).classify(docs, batch_size=3)
    assert (want - before).abs().max() > 1e-4, "the mutation does not change the logits: the test would be vacuous"
    assert (got - want).abs().max() <= 1e-6


def test_dtype_round_trip_then_in_place_change():
    """.double() keeps the values; the weights now live in new tensors, whose later changes must be seen."""
    model = tiny_model()
    docs = _docs()
    engine = Engine(model)
    engine.classify(docs, batch_size=3)
    model.double()
    assert (engine.classify(docs, batch_size=3) - Engine(model).classify(docs, batch_size=3)).abs().max() <= 1e-6
    _add(_query)(model)
    got = engine.classify(docs, batch_size=3)
    assert (got - Engine(model).classify(docs, batch_size=3)).abs().max() <= 1e-6


def test_refresh_force_picks_up_any_edit():
    model = tiny_model()
    docs = _docs()
    engine = Engine(model)
    engine.classify(docs, batch_size=3)
    old_plan = engine.plan
    _query(model).data[1, 1] += 1.0                       # a .data write of one element
    assert engine.refresh(force=True) == "forced" and engine.plan is not old_plan
    assert (engine.classify(docs, batch_size=3) - Engine(model).classify(docs, batch_size=3)).abs().max() <= 1e-6


def test_no_rebuild_without_a_change():
    """Calls, mode switches and a training forward/backward without a step keep the plan."""
    model = tiny_model()
    docs = _docs()
    engine = Engine(model)
    plan = engine.plan
    engine.classify(docs, batch_size=3)
    model.train()
    model(random_docs([30, 9], 60, low=3), labels=torch.tensor([1, 4])).loss.backward()
    model.eval()
    model.to(torch.float32)                               # already float32: the same tensors
    engine.classify(docs, batch_size=2)
    assert engine.refresh() is None and engine.plan is plan


def test_engine_does_not_change_the_model():
    """Not its mode (Engine.__init__ used to call .eval()), not its weights, not requires_grad."""
    model = tiny_model().train()
    model.model.classifier.weight.requires_grad_(False)
    modes = {name: m.training for name, m in model.named_modules()}
    state = {k: (v.clone(), v._version, v.requires_grad) for k, v in model.state_dict(keep_vars=True).items()}
    engine = Engine(model)
    engine.classify(_docs(), batch_size=3)
    assert {name: m.training for name, m in model.named_modules()} == modes
    for k, v in model.state_dict(keep_vars=True).items():
        value, version, requires_grad = state[k]
        assert torch.equal(v, value) and v._version == version and v.requires_grad == requires_grad, k


def test_threads_see_one_rebuild_and_the_new_weights(monkeypatch):
    """Threads call one Engine; between two rounds the weights change: every call of the first round
    gives the old logits, every call of the second the new ones, and the plan is rebuilt once."""
    model = tiny_model()
    docs = _docs()
    engine = Engine(model)
    old = Engine(model).classify(docs, batch_size=3)
    builds = []
    real = runner.InferencePlan

    def counting(*args, **kwargs):
        builds.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(runner, "InferencePlan", counting)

    barrier = threading.Barrier(THREADS + 1)
    got = {t: ([], []) for t in range(THREADS)}
    errors = []

    def work(t):
        try:
            for phase in (0, 1):
                barrier.wait()
                for _ in range(ROUNDS):
                    got[t][phase].append(engine.classify(docs, batch_size=1 + t))
                barrier.wait()
        except BaseException as e:  # noqa: BLE001 - reported below with the thread's number
            errors.append((t, e))
            barrier.abort()

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    barrier.wait()
    barrier.wait()                                     # the first round is done
    _add(_query)(model)
    barrier.wait()
    barrier.wait()
    for th in threads:
        th.join(timeout=120)
    assert not errors, errors
    want_new = Engine(model).classify(docs, batch_size=3)
    builds_by_threads = len(builds) - 1                 # the fresh Engine above built one
    assert (want_new - old).abs().max() > 1e-3
    for t in range(THREADS):
        assert all((r - old).abs().max() <= 1e-6 for r in got[t][0]), f"thread {t}, old weights"
        assert all((r - want_new).abs().max() <= 1e-6 for r in got[t][1]), f"thread {t}, new weights"
    assert builds_by_threads == 1


def test_a_call_keeps_its_plan_when_another_call_rebuilds():
    """A rebuild while a call runs does not reach that call: it finishes on the weights it started with."""
    model = tiny_model()
    docs = _docs()
    engine = Engine(model, overlap=False)
    old = Engine(model).classify(docs, batch_size=2)
    mid_run, rebuilt = threading.Event(), threading.Event()
    first_plan = engine.plan
    step, calls = first_plan.step, []

    def pausing_step(*args):
        calls.append(1)
        if len(calls) == 3:                 # mid-run: let the main thread change the model and rebuild
            mid_run.set()
            assert rebuilt.wait(60)
        return step(*args)
    first_plan.step = pausing_step
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("logits", engine.classify(docs, batch_size=2)))
    worker.start()
    assert mid_run.wait(60)
    _add(_query)(model)                      # a weight the plan copies (fused), not one it aliases
    new = engine.classify(docs, batch_size=2)
    rebuilt.set()
    worker.join(60)
    assert engine.plan is not first_plan
    assert (new - Engine(model).classify(docs, batch_size=2)).abs().max() <= 1e-6
    assert (new - old).abs().max() > 1e-4
    assert (result["logits"] - old).abs().max() <= 1e-6


def test_a_model_made_under_inference_mode_is_watched_too():
    """Inference tensors have no version counter: the Engine still runs, and notices a change through
    the sampled elements."""
    with torch.inference_mode():
        model = tiny_model()
    docs = _docs()
    engine = Engine(model)
    before = engine.classify(docs, batch_size=3)
    with torch.inference_mode():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    got = engine.classify(docs, batch_size=3)
    want = Engine(model).classify(docs, batch_size=3)
    assert (want - before).abs().max() > 1e-4
    assert (got - want).abs().max() <= 1e-6


@pytest.mark.parametrize("entry", ["classify", "classify_texts"])
def test_truncation_warning_names_the_callers_line(entry):
    bc = BertConfig(vocab_size=28996, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=64)
    engine = Engine(make_model(bc, num_mem_tokens=4, input_size=40, max_n_segments=2))
    with pytest.warns(UserWarning, match="max_n_segments") as caught:
        if entry == "classify":
            engine.classify(random_docs([100], 28996))
        else:
            engine.classify_texts(["the memory carries it " * 30], load_tokenizer(TOKENIZER_DIR))
    assert {w.filename for w in caught} == {__file__}


@pytest.mark.parametrize("entry", ["classify_texts", "classify_files", "classify_stream"])
def test_every_entry_point_sees_the_change(entry, tmp_path):
    bc = BertConfig(vocab_size=28996, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=64, initializer_range=0.2)
    model = make_model(bc, num_mem_tokens=4, input_size=40)
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    texts = ["the memory carries what each segment read " * k for k in (1, 9, 4)]
    paths = []
    for i, text in enumerate(texts):
        paths.append(tmp_path / f"{i}.txt")
        paths[-1].write_text(text)

    def run(engine):
        if entry == "classify_texts":
            return engine.classify_texts(texts, tokenizer, batch_size=2)
        if entry == "classify_files":
            return engine.classify_files(paths, tokenizer, batch_size=2)
        return engine.classify_stream([[t] for t in texts], tokenizer, batch_size=2)

    engine = Engine(model)
    before = run(engine)
    _add(_query)(model)
    got, want = run(engine), run(Engine(model))
    assert (want - before).abs().max() > 1e-4
    assert (got - want).abs().max() <= 1e-6
