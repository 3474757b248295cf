"""The static all-slot step (what CUDA graphs capture): on the CPU against the compact loop and the
oracle; on a GPU, graph replay against eager, warm-up that leaves memory alone, and flat VRAM."""
import re

import pytest
import torch
from transformers import BertConfig

from conftest import requires_cuda
from helpers import make_model, oracle, random_docs, tiny_model
from rmt_fast import Engine
from rmt_fast.bench import PeakMemory
from rmt_fast.engine import graphs
from rmt_fast.engine.steprows import BUSY, DEST, FIELDS, KEY_LEN, RESET, SLOT

LENGTHS = [5, 90, 1, 18, 19, 37, 200, 3, 18 * 7, 36]


def _static(engine):
    engine.static_loop = True
    return engine


@pytest.fixture(params=["extension", "torch twins"])
def memory_ops(request, monkeypatch):
    """Both implementations of segment_embed/memory_write: rmt_fast._C's (where built) and the torch twins."""
    from rmt_fast import _ext
    if request.param == "torch twins":
        monkeypatch.setattr(_ext, "segment_embed", _ext.segment_embed_torch)
        monkeypatch.setattr(_ext, "memory_write", _ext.memory_write_torch)
    elif not _ext.available():
        pytest.skip(f"rmt_fast._C is not built: {_ext.why_unavailable()}")
    return request.param


@pytest.mark.parametrize("alignment", ["right", "left"])
def test_static_loop_matches_compact_loop_and_oracle(alignment, memory_ops):
    model = tiny_model()
    model.config = model.config.replace(segment_alignment=alignment)
    docs = random_docs(LENGTHS, 60, low=3)
    want = torch.stack([oracle(model, d, alignment=alignment) for d in docs])
    for batch_size in (1, 3, 16):
        compact = Engine(model).classify(docs, batch_size=batch_size)
        static = _static(Engine(model)).classify(docs, batch_size=batch_size)
        assert (static - compact).abs().max() <= 1e-6
        assert (static.double() - want).abs().max() <= 1e-4


def test_static_loop_runs_only_the_width_of_the_busy_rows():
    """One long document among short ones: once they end, each step runs one row, not all slots."""
    model = tiny_model()
    S = model.config.segment_size
    docs = random_docs([S * 50, S, S * 2 + 3, S], 60, low=3)
    engine = _static(Engine(model))
    widths, step = [], engine.plan.step

    def counting(ids, memory, key_lengths):
        widths.append(ids.shape[0])
        return step(ids, memory, key_lengths)
    engine.plan.step = counting
    got = engine.classify(docs, batch_size=4)
    assert widths[:3] == [4, 2, 2] and set(widths[3:]) == {1} and len(widths) == 50
    want = torch.stack([oracle(model, d) for d in docs])
    assert (got.double() - want).abs().max() <= 1e-4


def test_step_all_masks_idle_slots_and_resets_starting_ones(memory_ops):
    model = tiny_model()
    cfg = model.config
    plan = Engine(model).plan
    B, T, M, H = 3, cfg.input_size, cfg.num_mem_tokens, plan.hidden
    state = torch.randn(B, M, H)
    before = state.clone()
    ids = torch.randint(3, 60, (B, T))
    meta = torch.zeros(FIELDS, B, dtype=torch.int64)
    meta[KEY_LEN] = T
    meta[DEST] = torch.tensor([0, 1, 5])           # row 5: the sink
    meta[BUSY] = torch.tensor([1, 1, 0])           # slot 2 idle
    meta[RESET] = torch.tensor([1, 0, 0])          # slot 0 starts a document
    meta[SLOT] = torch.tensor([0, 1, -1])
    results = torch.full((6, cfg.num_labels), float("nan"))
    graphs.step_all(plan, state, ids, meta, results, masked=False)
    mem = torch.stack([plan.initial_memory, before[1]])
    logits, new = plan.step(ids[:2], mem, None)
    assert torch.equal(state[2], before[2])                  # idle: untouched, bit for bit
    assert (state[:2] - new.float()).abs().max() <= 1e-6
    assert (results[:2] - logits).abs().max() <= 1e-6 and torch.isnan(results[2:5]).all()


def test_graph_status_on_cpu():
    engine = Engine(tiny_model())
    assert not engine.cuda_graphs and engine.graphs_status.startswith("off: device cpu")
    assert graphs.why_not(torch.device("cpu")) is not None
    runner = graphs.StepRunner(engine.plan, 2, 8, 3, use_graphs=True)
    assert runner.status.startswith("eager:")


# -- on a GPU ----------------------------------------------------------------------------------------

def _gpu_model():
    torch.manual_seed(3)
    # head_dim 64: a size the Triton kernel takes, so `auto` runs it (inside the graphs) in half precision
    bc = BertConfig(vocab_size=60, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=256, max_position_embeddings=64, initializer_range=0.2)
    return make_model(bc, num_mem_tokens=3, input_size=24, cls_token_id=1, sep_token_id=2, pad_token_id=0)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("attention", ["auto", "sdpa"])
def test_graph_replay_equals_eager(dtype, attention):
    model = _gpu_model()
    # Full segments first; a padded one starts when a slot frees: the masked graph is captured
    # mid-run, while the other slots hold live memory.
    docs = [torch.randint(3, 60, (n,)) for n in (18 * 40, 18 * 33, 18 * 20, 18 * 10, 7, 18 * 3 + 4)]
    eager = Engine(model, "cuda", dtype, attention, cuda_graphs=False).classify(docs, batch_size=4)
    engine = Engine(model, "cuda", dtype, attention, cuda_graphs=True)
    graphed = engine.classify(docs, batch_size=4)
    assert engine.graphs_status.startswith("on"), engine.graphs_status
    assert re.search(r"\bmasked\b", engine.graphs_status) and "unmasked" in engine.graphs_status
    assert (graphed - eager).abs().max() <= 1e-6
    again = engine.classify(docs, batch_size=4)                             # replayed, nothing captured
    assert torch.equal(again, graphed)
    if dtype == torch.float32:
        cpu = Engine(model).classify(docs, batch_size=4)
        assert (graphed - cpu).abs().max() <= 1e-4


def _runner_with_live_state(model, device):
    """A StepRunner for 4 slots whose state, results and ring step 0 hold live-looking values."""
    engine = Engine(model, device)
    runner = graphs.StepRunner(engine.plan, 4, 8, 3, use_graphs=True)
    runner.state.copy_(torch.randn_like(runner.state))
    runner.results.copy_(torch.randn_like(runner.results))
    T, vocab = model.config.input_size, model.config.vocab_size
    runner.ring_ids[0, 0] = torch.randint(3, vocab, (4, T))
    meta = runner.ring_meta[0, 0]
    meta[KEY_LEN] = torch.tensor([T, 7, T, 9])
    meta[DEST] = torch.tensor([0, 8, 1, 8])
    meta[BUSY] = 1
    meta[RESET] = torch.tensor([1, 0, 0, 1])
    meta[SLOT] = torch.arange(4)
    runner.begin_chunk(0)
    return runner


def _live(runner):
    return [t.clone() for t in (runner.state, runner.results, runner.cursor)]


def test_warm_up_runs_on_scratch_copies():
    """What CUDA graph capture does first, on the CPU: the warm-up steps compute, and leave the live
    memory state, results and cursor bit-equal."""
    runner = _runner_with_live_state(tiny_model(), "cpu")
    before = _live(runner)
    calls, step = [], runner.plan.step

    def counting(ids, memory, key_lengths):
        calls.append(ids.shape[0])
        return step(ids, memory, key_lengths)
    runner.plan.step = counting
    for width in (4, 2):
        for masked in (False, True):
            runner.warm_up(width, masked)
    assert calls == [4] * 2 * graphs.WARMUP_STEPS + [2] * 2 * graphs.WARMUP_STEPS
    for got, want in zip(_live(runner), before):
        assert torch.equal(got, want)
    runner.step(4, masked=True)                              # the live step still moves them
    assert int(runner.cursor) == 1 and not torch.equal(runner.state, before[0])


def test_warm_up_mid_run_leaves_results_alone():
    """Warm-ups before every step of a run (as captures happen mid-run on CUDA): the same logits, bit for bit."""
    model = tiny_model()
    docs = random_docs(LENGTHS, 60, low=3)
    want = _static(Engine(model)).classify(docs, batch_size=3)
    engine = _static(Engine(model))
    runner = engine._runner(3)
    live_step = runner.step

    def warm_then_step(width, masked):
        runner.warm_up(width, masked)
        live_step(width, masked)
    runner.step = warm_then_step
    assert torch.equal(engine.classify(docs, batch_size=3), want)


@requires_cuda
def test_warm_up_and_capture_leave_memory_alone():
    runner = _runner_with_live_state(_gpu_model(), "cuda")
    before = _live(runner)
    for width in (4, 2):
        for masked in (False, True):
            assert runner._graph(width, masked) is not None, runner.status
        torch.cuda.synchronize()
        for got, want in zip(_live(runner), before):
            assert torch.equal(got, want)


@requires_cuda
def test_capture_failure_falls_back_to_eager(monkeypatch):
    model = _gpu_model()
    docs = [torch.randint(3, 60, (n,)) for n in (50, 7)]
    want = Engine(model, "cuda", cuda_graphs=False).classify(docs, batch_size=2)

    def broken(*a, **kw):
        raise RuntimeError("no capture today")
    monkeypatch.setattr(torch.cuda, "CUDAGraph", broken)
    engine = Engine(model, "cuda", cuda_graphs=True)
    with pytest.warns(RuntimeWarning, match="capture failed"):
        got = engine.classify(docs, batch_size=2)
    assert "eager: CUDA graph capture failed" in engine.graphs_status
    assert torch.equal(got, want)


@requires_cuda
@pytest.mark.parametrize("batch_size", [1, 4])
def test_graphed_vram_flat_from_16_to_4096_segments(batch_size):
    model = _gpu_model()
    engine = Engine(model, "cuda", cuda_graphs=True)
    S = model.config.segment_size
    engine.classify([torch.randint(3, 60, (2 * S,))] * batch_size, batch_size=batch_size)   # capture
    peaks = {}
    for n in (16, 4096):
        docs = [torch.randint(3, 60, (n * S,)) for _ in range(batch_size)]
        with PeakMemory("cuda") as m:
            engine.classify(docs, batch_size=batch_size)
        peaks[n] = m.peak
    assert engine.graphs_status.startswith("on")
    assert peaks[4096] - peaks[16] <= 2**20, peaks


@requires_cuda
def test_streaming_on_cuda_matches_cpu(tmp_path):
    from rmt_fast.tokenize import load_tokenizer
    from helpers import ASSETS
    tok = load_tokenizer(ASSETS)
    torch.manual_seed(5)
    bc = BertConfig(vocab_size=28996, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=256, max_position_embeddings=64, initializer_range=0.2)
    model = make_model(bc, num_mem_tokens=4, input_size=40, segment_alignment="left")
    texts = ["word " * n for n in (1, 50, 700, 3000)]
    cpu = Engine(model).classify_texts(texts, tok, batch_size=2)
    gpu = Engine(model, "cuda").classify_texts(texts, tok, batch_size=2)
    assert (gpu - cpu).abs().max() <= 1e-4
