"""The memory arithmetic of engine/memory_budget.py against the tensors the Engine really allocates (CPU)."""
import pytest
import torch

from helpers import bert_base_cased_config, make_model, random_docs, tiny_model
from rmt_fast.engine import memory_budget
from rmt_fast.engine.linear import Linear
from rmt_fast.engine.runner import Engine


def _plan_tensors(plan):
    """Bytes of every tensor the plan holds (weights, tables, initial memory), each once: views count
    their own elements (the last layer's q and kv are row slices of one fused weight; a CUDA copy of a
    view holds just those)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and (t.data_ptr(), t.numel()) not in seen:
            seen.add((t.data_ptr(), t.numel()))
            total += t.nbytes

    for v in vars(plan).values():
        add(v)
    for layer in plan.layers:
        for v in vars(layer).values():
            if isinstance(v, Linear):
                add(v.weight), add(v.bias)
            else:
                add(v)
    return total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_weight_bytes_match_the_plan(dtype):
    bc = bert_base_cased_config(num_layers=2)
    model = make_model(bc, num_mem_tokens=10, input_size=512)
    engine = Engine(model, dtype=dtype, packed_weights=False)       # the layout CUDA uses
    assert memory_budget.weight_bytes(model.config, bc, dtype) == _plan_tensors(engine.plan)


@pytest.mark.parametrize("slots, widths", [(3, {1, 2, 3}), (4, {1, 2, 4})])
def test_static_buffers_match_the_runner(slots, widths):
    model = tiny_model()
    engine = Engine(model, dtype="float32")
    engine.static_loop = True                                      # the CUDA loop, on the CPU
    docs = random_docs([5, 40, 90, 17, 130, 3, 66], model.config.vocab_size, low=3)
    engine.classify(docs, batch_size=slots)
    (runner,) = engine._runners.values()
    est = memory_budget.estimate(model.config, model.model.config, torch.float32, slots)
    width_bytes = 8 * (model.config.input_size + 5)
    assert set(runner._inp) <= widths                              # the widths the feeder compacts to
    assert all(t.nbytes == width_bytes * w for w, t in runner._inp.items())
    assert est.static == runner.state.nbytes + runner.results.nbytes + width_bytes * sum(widths)


def test_max_slots_fits_the_budget_and_one_more_does_not():
    bc = bert_base_cased_config(num_layers=12)
    model = make_model(bc, num_mem_tokens=10, input_size=512)
    cfg = model.config
    best = memory_budget.max_slots(cfg, bc, torch.float32, "10GiB")
    assert best.total <= 10 * 2**30
    assert memory_budget.estimate(cfg, bc, torch.float32, best.slots + 1).total > 10 * 2**30
    assert best.slots >= 2
    one = memory_budget.estimate(cfg, bc, torch.float32, 1)
    with pytest.raises(ValueError, match=rf"cannot fit one slot: the minimum .* float32 is {one.total / 2**30:.2f} GiB"):
        memory_budget.max_slots(cfg, bc, torch.float32, int(one.total) - 1)
    assert memory_budget.max_slots(cfg, bc, torch.float32, one.total).slots == 1


@pytest.mark.parametrize("text, want", [("10GiB", 10 * 2**30), ("3.5 GB", 3_500_000_000), ("512MiB", 2**29),
                                        (1000, 1000)])
def test_parse_bytes(text, want):
    assert memory_budget.parse_bytes(text) == want


@pytest.mark.parametrize("bad", ["ten", "-1GiB", "0", "5TB"])
def test_parse_bytes_rejects(bad):
    with pytest.raises(ValueError, match="max_memory"):
        memory_budget.parse_bytes(bad)
