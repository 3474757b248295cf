"""Checkpoints: a reference-format model_best.pth written here from docs/REFERENCE.md's key list, round trips."""
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from helpers import oracle, random_docs, tiny_model
from oracle import oracle_logits
from rmt_fast import Engine, RMTForSequenceClassification
from rmt_fast.checkpoints import CheckpointError, CheckpointMismatchError, save_reference_checkpoint

V, M, T = 60, 4, 24
CLS, SEP, PAD = 1, 2, 0


def backbone_config(**kw):
    d = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64, initializer_range=0.2, num_labels=5)
    d.update(kw)
    return BertConfig(**d)


def write_reference_checkpoint(path, with_position_ids=True):
    """What the reference's torch.save writes, built by hand: returns the backbone it holds."""
    bc = backbone_config(vocab_size=V + M)
    hf = BertForSequenceClassification(bc).eval()
    state = {"cls_token": torch.tensor([CLS]), "sep_token": torch.tensor([SEP]),
             "mem_token_ids": torch.arange(V, V + M)}
    for k, v in hf.state_dict().items():
        state["model." + k] = v.clone()
    state["model.embeddings.weight"] = state["model.bert.embeddings.word_embeddings.weight"]
    if with_position_ids:
        state["model.bert.embeddings.position_ids"] = torch.arange(64)[None]
    torch.save({"model_state_dict": state, "optimizer_state_dict": {"state": {}, "param_groups": []},
                "iteration": 1234}, path)
    return hf


@pytest.mark.parametrize("with_position_ids", [True, False])
def test_reference_checkpoint_gives_reference_logits(tmp_path, with_position_ids):
    path = tmp_path / "model_best.pth"
    hf = write_reference_checkpoint(path, with_position_ids)
    cfg_file = tmp_path / "config.json"
    backbone_config().to_json_file(str(cfg_file))
    model = RMTForSequenceClassification.from_reference_checkpoint(path, backbone_config=cfg_file, input_size=T)
    assert (model.config.num_mem_tokens, model.config.vocab_size, model.config.num_labels) == (M, V, 5)
    docs = random_docs([1, 19, 20, 21, 77], V, low=3)
    got = Engine(model).classify(docs, batch_size=3)
    with torch.no_grad():
        want = torch.stack([oracle_logits(hf, d, vocab_size=V, num_mem_tokens=M, input_size=T, cls_id=CLS,
                                          sep_id=SEP, pad_id=PAD) for d in docs])
    assert (got - want).abs().max() <= 1e-4


def test_backbone_config_as_directory_or_object(tmp_path):
    path = tmp_path / "model_best.pth"
    write_reference_checkpoint(path)
    backbone_config().save_pretrained(tmp_path / "cfg")
    a = RMTForSequenceClassification.from_reference_checkpoint(path, tmp_path / "cfg", input_size=T)
    b = RMTForSequenceClassification.from_reference_checkpoint(path, backbone_config(), input_size=T)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_mismatched_checkpoint_lists_every_problem(tmp_path):
    path = tmp_path / "model_best.pth"
    write_reference_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    state = ckpt["model_state_dict"]
    del state["model.bert.pooler.dense.bias"]
    state["model.extra.weight"] = torch.zeros(3)
    torch.save(ckpt, path)
    with pytest.raises(CheckpointMismatchError) as e:
        RMTForSequenceClassification.from_reference_checkpoint(path, backbone_config(intermediate_size=48),
                                                               input_size=T)
    msg = str(e.value)
    assert "model.bert.pooler.dense.bias" in msg and "model.extra.weight" in msg
    assert "intermediate.dense.weight: checkpoint (64, 32) vs model (48, 32)" in msg


def test_wrong_vocabulary_and_not_a_checkpoint(tmp_path):
    path = tmp_path / "model_best.pth"
    write_reference_checkpoint(path)
    with pytest.raises(CheckpointMismatchError, match="vocab_size=100"):
        RMTForSequenceClassification.from_reference_checkpoint(path, backbone_config(vocab_size=100), input_size=T)
    torch.save({"model_state_dict": {"w": torch.zeros(2)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointMismatchError, match="not an RMT checkpoint"):
        RMTForSequenceClassification.from_reference_checkpoint(tmp_path / "other.pth", backbone_config())


def test_pickles_load_weights_only(tmp_path):
    """A checkpoint holding arbitrary Python objects is refused, never unpickled."""
    import argparse
    torch.save({"model_state_dict": {}, "obj": argparse.Namespace(x=1)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="evil.pth: not a checkpoint that can be loaded safely") as e:
        RMTForSequenceClassification.from_reference_checkpoint(tmp_path / "evil.pth", backbone_config())
    assert "weights_only=False" not in str(e.value) and "False" not in str(e.value)


def test_safetensors_round_trip_is_bit_exact(tmp_path):
    model = tiny_model(label_names=("a", "b", "c", "d", "e", "f"))
    model.save_pretrained(tmp_path / "m")
    again = RMTForSequenceClassification.from_pretrained(tmp_path / "m")
    assert again.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b)
    docs = random_docs([30, 5], 60, low=3)
    assert torch.equal(Engine(model).classify(docs), Engine(again).classify(docs))


def test_export_to_reference_format_loads_back(tmp_path):
    model = tiny_model()
    save_reference_checkpoint(model, tmp_path / "model_best.pth")
    bc = model.model.config.to_dict()
    bc["vocab_size"] = model.config.vocab_size
    again = RMTForSequenceClassification.from_reference_checkpoint(
        tmp_path / "model_best.pth", BertConfig(**bc), input_size=model.config.input_size)
    docs = random_docs([40], 60, low=3)
    assert torch.equal(Engine(model).classify(docs), Engine(again).classify(docs))
    assert (Engine(again).classify(docs).double() - oracle(model, docs[0])).abs().max() <= 1e-4


def test_from_pretrained_rejects_foreign_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        RMTForSequenceClassification.from_pretrained(tmp_path)


def test_checkpoints_do_not_import_the_model():
    """The formats live in checkpoints.py and the model builds itself from them: model -> checkpoints only."""
    import ast
    from pathlib import Path

    import rmt_fast.checkpoints as checkpoints

    tree = ast.parse(Path(checkpoints.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported |= {f"{node.module}.{a.name}" if node.module else a.name for a in node.names} | {node.module}
        elif isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
    assert not [m for m in imported if m and ("model" in m.split(".") or m.startswith("engine"))], imported


def test_load_takes_a_folder_or_a_reference_file(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "m")
    model.save_reference_checkpoint(tmp_path / "model_best.pth")
    bc = model.model.config.to_dict()
    bc["vocab_size"] = model.config.vocab_size
    a = RMTForSequenceClassification.load(tmp_path / "m")
    b = RMTForSequenceClassification.load(tmp_path / "model_best.pth", BertConfig(**bc), input_size=24)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ValueError, match="--backbone-config"):
        RMTForSequenceClassification.load(tmp_path / "model_best.pth")
