"""scripts/reasoning_binding.py: it reads the attention of each fact's direction word at the right tokens."""
import importlib.util
import json
from pathlib import Path

import torch

from rmt_fast import tasks as T
from rmt_fast.backbones import build_model
from rmt_fast.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "reasoning_binding.py"
BERT_CASED = str(ROOT / "rmt_fast" / "data" / "bert-base-cased")


def _script():
    spec = importlib.util.spec_from_file_location("reasoning_binding", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_model():
    torch.manual_seed(0)
    cfg = TrainConfig(out_dir="unused", backbone=BERT_CASED, random_init=True, num_layers=2, hidden_size=32,
                      num_heads=2, intermediate_size=64, input_size=48, num_mem_tokens=3)
    model, tok = build_model(cfg)
    return model.eval(), tok


def test_positions_are_the_direction_and_the_places_the_model_reads():
    script = _script()
    model, tok = _tiny_model()
    samples = T.TaskGenerator("reasoning", tok, model.config, split="validation", seed=1).samples(1, range(12))
    seen = {}
    forward = model.segment_forward

    def spy(ids, memory, *args):
        seen["ids"] = ids
        return forward(ids, memory, *args)

    model.segment_forward = spy
    with torch.no_grad():
        model([s.input_ids for s in samples])
    ids = seen["ids"]                                              # [12, input_size] as laid out
    pos = script.fact_positions(samples, model.config.input_size - model.config.segment_size - 1)
    assert pos.shape == (24, 4)
    words = lambda column: tok.convert_ids_to_tokens(ids[pos[:, 0], pos[:, column]].tolist())
    assert set(words(1)) <= set(T.DIRECTIONS)
    for k, (row, _, own, other) in enumerate(pos.tolist()):
        s = samples[row]
        mine, theirs = s.facts[k % 2].split()[1], s.facts[1 - k % 2].split()[1]
        assert tok.convert_ids_to_tokens([int(ids[row, own]), int(ids[row, other])]) == [mine, theirs]


def test_writes_every_head_of_every_layer(tmp_path):
    script = _script()
    model, tok = _tiny_model()
    result = script.binding(model, tok, n_samples=8)
    assert [(h["layer"], h["head"]) for h in result["heads"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(0 <= h["own_place"] <= 1 and 0 <= h["other_place"] <= 1 for h in result["heads"])
    assert 0 <= result["accuracy"] <= 1 and result["samples"] == 8
    assert "segment_forward" not in vars(model)                   # the model is left as it was
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(str(tmp_path / "m"))
    script.main([str(tmp_path / "m"), str(tmp_path / "out.json"), "8"])
    assert json.loads((tmp_path / "out.json").read_text())["heads"] == result["heads"]
