"""scripts/memory_probe.py: the samples it reads and the probes it fits (issue 15's write/read split)."""
import importlib.util
from pathlib import Path

import torch

from rmt_fast import tasks as T
from rmt_fast.backbones import build_model
from rmt_fast.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
BERT_CASED = str(ROOT / "rmt_fast" / "data" / "bert-base-cased")


def _script():
    spec = importlib.util.spec_from_file_location("memory_probe", ROOT / "scripts" / "memory_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memories_are_of_samples_with_both_facts_in_the_first_segment():
    script = _script()
    torch.manual_seed(0)
    cfg = TrainConfig(out_dir="unused", backbone=BERT_CASED, random_init=True, num_layers=2, hidden_size=32,
                      num_heads=2, intermediate_size=64, input_size=48, num_mem_tokens=3)
    model, tok = build_model(cfg)
    mem, places, dirs = script.memories(model.eval(), tok, 9, seed=2, split="validation")
    assert mem.shape == (9, 3 * 32) and places.shape == dirs.shape == (9, 2)
    gen = T.TaskGenerator("reasoning", tok, model.config, split="validation", seed=2)
    S = model.config.segment_size
    kept = [s for s in (gen.sample(2, i) for i in range(200)) if max(e for _, e in s.fact_spans) <= S][:9]
    for s, p, d in zip(kept, places.tolist(), dirs.tolist()):
        assert [f"The {T.PLACES[a]} is {T.DIRECTIONS[b]} of the" for a, b in zip(p, d)] == \
            [f.rsplit(" ", 1)[0] for f in s.facts]
    assert not torch.equal(mem[0], mem[1])                       # each sample's own memory
    mem2, _, _, right, forms = script.memories(model.eval(), tok, 9, seed=2, split="validation", answers=True)
    assert torch.equal(mem2, mem) and right.shape == (9,) and right.dtype == torch.bool
    assert forms == ["opposite" if s.question.startswith("What is the") else "direct" for s in kept]


def test_probes_find_a_planted_binding_and_not_a_missing_one():
    """Features that hold the pairing linearly (one block per direction: its place, one-hot) give a
    binding probe near 100%; features that hold only the set of places give ~50% on binding, while
    the places probe is near 100% for both."""
    script = _script()
    g = torch.Generator().manual_seed(0)

    def data(n):
        places = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(n)])
        dirs = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(n)])
        bound = torch.zeros(n, 4, 6)
        bound[torch.arange(n)[:, None], dirs, places] = 1
        bag = torch.zeros(n, 6 + 4)
        bag[torch.arange(n)[:, None], places] = 1
        bag[torch.arange(n)[:, None], 6 + dirs] = 1
        noise = 0.1 * torch.randn(n, 24, generator=g)
        return bound.flatten(1) + noise, torch.cat([bag, noise[:, :14]], 1), places, dirs

    btr, ntr, ptr, dtr = data(600)
    bte, nte, pte, dte = data(300)
    good = script.probes(btr, ptr, dtr, bte, pte, dte)
    bad = script.probes(ntr, ptr, dtr, nte, pte, dte)
    assert min(good["places"]) > 0.95 and min(bad["places"]) > 0.95
    assert min(a for a, _ in good["binding"]) > 0.95
    assert max(a for a, _ in bad["binding"]) < 0.7
    assert sum(m for _, m in good["binding"]) == 2 * 300         # each sample has two directions


def test_bound_place_is_the_place_in_that_direction():
    script = _script()
    places = torch.tensor([[0, 5], [2, 3], [4, 1]])
    dirs = torch.tensor([[1, 2], [2, 0], [3, 1]])
    keep, place = script.bound_place(dirs, places, 2)
    assert keep.tolist() == [True, True, False] and place.tolist() == [5, 2]
    keep, place = script.bound_place(dirs, places, 1)
    assert keep.tolist() == [True, False, True] and place.tolist() == [0, 1]
