"""Training: a tiny model learns Memorize through the memory; curriculum; resume; export; DDP."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rmt_fast import tasks as T
from rmt_fast.model import RMTForSequenceClassification
from rmt_fast.train import TrainConfig, add_cli, evaluate_accuracy, read_metrics, train

ROOT = Path(__file__).resolve().parents[1]
BERT_CASED = str(ROOT / "rmt_fast" / "data" / "bert-base-cased")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny(out_dir, **kw) -> TrainConfig:
    """A 1-layer, 64-wide BERT on bert-base-cased's vocabulary, 2 memory tokens, 20-token segments."""
    base = dict(out_dir=str(out_dir), task=("memorize",), backbone=BERT_CASED, random_init=True, num_layers=1,
                hidden_size=64, num_heads=4, intermediate_size=128, dropout=0.0, input_size=20, num_mem_tokens=2,
                min_segments=1, max_segments=2, stage_steps=4, eval_every=2, val_samples=16, batch_size=8,
                lr=1e-3, warmup_steps=2, threshold=1.01, progress=False, log_every=1, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def metrics(out_dir):
    return [json.loads(line) for line in open(Path(out_dir) / "metrics.jsonl")]


def weights(directory):
    return load_file(str(Path(directory) / "model.safetensors"))


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    out = tmp_path_factory.mktemp("learned")
    cfg = tiny(out, stage_steps=300, eval_every=25, val_samples=64, batch_size=32, threshold=0.9, log_every=25)
    final = train(cfg)
    return cfg, final


def test_tiny_model_learns_memorize_at_two_segments(learned):
    cfg, final = learned
    model = RMTForSequenceClassification.from_pretrained(final)
    tok = T.load_tokenizer(final)
    # Fresh validation samples (another seed): the fact is one segment before the question,
    # so only the memory can carry it.
    gen = T.TaskGenerator("memorize", tok, model.config, split="validation", seed=99)
    acc = evaluate_accuracy(model, gen, 2, 96, 32, torch.device("cpu"))
    assert acc >= 0.9, acc
    ends = [m for m in metrics(cfg.out_dir) if m["event"] == "stage_end"]
    assert [m["stage"] for m in ends] == [1, 2]


def test_curriculum_stages_start_from_previous_best(learned):
    cfg, final = learned
    ms = metrics(cfg.out_dir)
    starts = [m for m in ms if m["event"] == "stage_start"]
    assert starts[0]["stage"] == 1 and starts[1]["init"] == str(Path(cfg.out_dir) / "stages" / "1" / "best")
    for stage in (1, 2):
        best = max(m["val_accuracy"] for m in ms if m["event"] == "eval" and m["stage"] == stage)
        assert [m["best"] for m in ms if m["event"] == "stage_end" and m["stage"] == stage] == [best]
    # The final model is the last stage's best, with the tokenizer beside it.
    assert all(torch.equal(a, b) for a, b in zip(weights(final).values(),
                                                  weights(Path(cfg.out_dir) / "stages/2/best").values()))
    docs = ["Mary went to the garden.", "Where is Mary?"]
    assert T.load_tokenizer(final)(docs)["input_ids"] == T.load_tokenizer(BERT_CASED)(docs)["input_ids"]


def test_stage_ends_on_threshold_or_budget(tmp_path):
    train(tiny(tmp_path / "budget", threshold=1.01, max_segments=3, stage_steps=3))
    ends = [m for m in metrics(tmp_path / "budget") if m["event"] == "stage_end"]
    assert [(m["stage"], m["steps"], m["reason"]) for m in ends] == [(1, 3, "budget"), (2, 3, "budget"),
                                                                    (3, 3, "budget")]
    train(tiny(tmp_path / "thr", threshold=0.0, stage_steps=10, eval_every=2))
    ends = [m for m in metrics(tmp_path / "thr") if m["event"] == "stage_end"]
    assert [(m["stage"], m["steps"], m["reason"]) for m in ends] == [(1, 2, "threshold"), (2, 2, "threshold")]


def test_resume_equals_uninterrupted(tmp_path):
    kw = dict(dropout=0.1, stage_steps=4, eval_every=2)
    whole = train(tiny(tmp_path / "whole", **kw))
    assert train(tiny(tmp_path / "parts", stop_after=3, **kw)) == tmp_path / "parts" / "last"
    assert not (tmp_path / "parts" / "final").exists()
    with pytest.raises(FileExistsError):
        train(tiny(tmp_path / "parts", **kw))
    parts = train(tiny(tmp_path / "parts", stop_after=6, **kw), resume=True)
    assert parts == tmp_path / "parts" / "last"
    parts = train(tiny(tmp_path / "parts", **kw), resume=True)
    a, b = weights(whole), weights(parts)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    evals = lambda d: [(m["stage"], m["step"], m["val_accuracy"]) for m in metrics(d) if m["event"] == "eval"]
    assert evals(tmp_path / "whole") == evals(tmp_path / "parts")
    losses = lambda d: {(m["stage"], m["step"]): m["loss"] for m in metrics(d) if m["event"] == "train"}
    assert losses(tmp_path / "whole") == losses(tmp_path / "parts")


def test_reference_export_loads_back(learned):
    from transformers import AutoConfig

    _, final = learned
    meta = json.loads((final / "config.json").read_text())
    backbone = dict(meta["backbone"])
    bconf = AutoConfig.for_model(backbone.pop("model_type"), **backbone)
    state = torch.load(final / "model_best.pth", weights_only=True)["model_state_dict"]
    assert torch.equal(state["model.embeddings.weight"], state["model.bert.embeddings.word_embeddings.weight"])
    ref = RMTForSequenceClassification.from_reference_checkpoint(final / "model_best.pth", bconf, input_size=meta["rmt"]["input_size"],
                                    label_names=T.LABEL_NAMES)
    ours = RMTForSequenceClassification.from_pretrained(final)
    docs = [torch.randint(1000, 20000, (n,)) for n in (5, 17, 40)]
    with torch.no_grad():
        torch.testing.assert_close(ref(docs).logits, ours(docs).logits, rtol=0, atol=0)


def test_cli_parses_into_train_config(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    args = parser.parse_args(["train", str(tmp_path), "--task", "memorize,detect", "--max-segments", "3",
                              "--lr", "3e-4", "--precision", "bf16", "--random-init"])
    assert args.func.__module__ == "rmt_fast.train" and args.max_segments == 3 and args.lr == 3e-4


def test_bf16_autocast_trains(tmp_path):
    final = train(tiny(tmp_path / "bf16", precision="bf16", stage_steps=2))
    assert all(torch.isfinite(t).all() for t in weights(final).values() if t.is_floating_point())


def _run(cmd, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, **kw)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _cli_args(out):
    return [str(out), "--task", "memorize", "--backbone", BERT_CASED, "--random-init", "--num-layers", "1",
            "--hidden-size", "32", "--num-heads", "2", "--intermediate-size", "64", "--dropout", "0",
            "--input-size", "20", "--num-mem-tokens", "2", "--min-segments", "2", "--max-segments", "2",
            "--stage-steps", "3", "--eval-every", "3", "--val-samples", "8", "--batch-size", "8",
            "--lr", "1e-3", "--warmup-steps", "1", "--threads", "1", "--no-progress"]


def test_ddp_two_cpu_processes_match_one(tmp_path):
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
          "-m", "rmt_fast.train"] + _cli_args(tmp_path / "ddp"))
    _run([sys.executable, "-m", "rmt_fast.train"] + _cli_args(tmp_path / "one"))
    a, b = weights(tmp_path / "ddp" / "final"), weights(tmp_path / "one" / "final")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    # Both saw the same global batches, so the logged losses agree too.
    la = [m["loss"] for m in metrics(tmp_path / "ddp") if m["event"] == "train"]
    lb = [m["loss"] for m in metrics(tmp_path / "one") if m["event"] == "train"]
    assert la == pytest.approx(lb, rel=1e-4)


# -- resuming what was started, after a stop or a kill ----------------------------------------------

RESUME_KW = dict(dropout=0.1, stage_steps=4, eval_every=2, log_every=1)


def test_resume_refuses_a_changed_flag(tmp_path):
    out = tmp_path / "run"
    train(tiny(out, stop_after=2, **RESUME_KW))
    saved = (out / "train_config.json").read_text()
    with pytest.raises(ValueError, match=r"--resume: --lr changed from 0\.001 to 0\.0005"):
        train(tiny(out, lr=5e-4, **RESUME_KW), resume=True)
    with pytest.raises(ValueError, match=r"--task changed from \['memorize'\] to \['memorize', 'detect'\]"):
        train(tiny(out, task=("memorize", "detect"), **RESUME_KW), resume=True)
    assert (out / "train_config.json").read_text() == saved
    # Flags that cannot change the result may change.
    assert train(tiny(out, stop_after=3, threads=1, progress=False, **RESUME_KW), resume=True) == out / "last"


def _comparable(records):
    keys = ("event", "stage", "step", "steps", "loss", "accuracy", "val_accuracy", "best", "reason")
    return [{k: r[k] for k in keys if k in r} for r in records if r["event"] != "resume"]


KILL_SCRIPT = """
import json, os, sys
from rmt_fast.train import TrainConfig, train
where, seen = sys.argv[2], []
real_rename, real_replace = os.rename, os.replace
def maybe_die(src, dst):
    # The second save of last/ (stage 2, step 2): die as SIGKILL would, at the chosen instant.
    if where == "between-renames" and str(src).endswith("last.new") and str(dst).endswith("last"):
        seen.append(dst)
    if where == "writing-new" and str(dst).endswith(os.path.join("last.new", "train_state.pt")):
        seen.append(dst)
    if len(seen) == 2:
        os.kill(os.getpid(), 9)
os.rename = lambda a, b: (maybe_die(a, b), real_rename(a, b))[1]
os.replace = lambda a, b: (maybe_die(a, b), real_replace(a, b))[1]
train(TrainConfig(**json.loads(sys.argv[1])))
"""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    return train(tiny(out, **RESUME_KW)), out


@pytest.mark.parametrize("where", ["between-renames", "writing-new"])
def test_killed_checkpoint_swap_resumes_the_same_run(tmp_path, where, uninterrupted, capsys):
    import dataclasses

    whole_final, whole = uninterrupted
    out = tmp_path / "run"
    cfg = tiny(out, **RESUME_KW)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", KILL_SCRIPT, json.dumps(dataclasses.asdict(cfg)), where], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr[-3000:]
    final = train(cfg, resume=True)
    err = capsys.readouterr().err
    resumed = [m for m in metrics(out) if m["event"] == "resume"]
    if where == "between-renames":
        # last/ was gone: the complete new copy (stage 2, step 2) is recovered, and the user is told.
        assert "recovered it from last.new" in err
        assert [(m["stage"], m["step"]) for m in resumed] == [(2, 2)] and resumed[0]["recovered"]
    else:
        # killed while last.new was written: last/ (stage 1, step 2) is complete and continues.
        assert "recovered" not in err
        assert [(m["stage"], m["step"], m["recovered"]) for m in resumed] == [(1, 2, [])]
    a, b = weights(whole_final), weights(final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in out.iterdir()) == ["final", "last", "metrics.jsonl", "stages", "train_config.json"]
    # The replayed steps are in the file twice; read_metrics counts each once, as the whole run logged it.
    assert _comparable(read_metrics(out / "metrics.jsonl")) == _comparable(metrics(whole))
    if where == "writing-new":
        assert len(metrics(out)) > len(read_metrics(out / "metrics.jsonl"))


def test_resume_with_a_truncated_checkpoint_names_the_file(tmp_path, capsys):
    from rmt_fast.cli import main

    out = tmp_path / "run"
    cfg = tiny(out, stop_after=2, **RESUME_KW)
    train(cfg)
    f = out / "last" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    args = [str(out), "--resume", "--task", "memorize", "--backbone", BERT_CASED, "--random-init",
            "--num-layers", "1", "--hidden-size", "64", "--num-heads", "4", "--intermediate-size", "128",
            "--dropout", "0.1", "--input-size", "20", "--num-mem-tokens", "2", "--max-segments", "2",
            "--stage-steps", "4", "--eval-every", "2", "--val-samples", "16", "--batch-size", "8", "--lr", "1e-3",
            "--warmup-steps", "2", "--threshold", "1.01", "--log-every", "1", "--no-progress", "--stop-after", "2"]
    assert main(["train"] + args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {f}: truncated or not a safetensors file") and err.count("\n") == 1


def test_read_metrics_takes_the_last_record_of_each_step(tmp_path):
    lines = [{"event": "train", "stage": 1, "step": 1, "loss": 3.0}, {"event": "train", "stage": 1, "step": 2, "loss": 2.5},
             {"event": "resume", "stage": 1, "step": 1}, {"event": "train", "stage": 1, "step": 2, "loss": 2.4},
             {"event": "eval", "stage": 1, "step": 2, "val_accuracy": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    got = [(r["event"], r["step"], r.get("loss")) for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert got == [("train", 1, 3.0), ("resume", 1, None), ("train", 2, 2.4), ("eval", 2, None)]
