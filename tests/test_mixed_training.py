"""The mixed-task training loop (Memorize, Detect & Memorize, Reasoning in one model) on a tiny config:
Reasoning rises above chance in a few steps, and validation reports each task's accuracy."""
from pathlib import Path

import torch

from rmt_fast import tasks as T
from rmt_fast.evaluate import predict
from rmt_fast.model import RMTForSequenceClassification
from rmt_fast.train import TrainConfig, read_metrics, train

BERT_CASED = str(Path(__file__).resolve().parents[1] / "rmt_fast" / "data" / "bert-base-cased")


def test_mixed_tasks_learn_reasoning_above_chance(tmp_path):
    torch.set_num_threads(1)
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), task=("memorize", "detect", "reasoning", "reasoning"),
                      backbone=BERT_CASED, random_init=True, num_layers=1, hidden_size=64, num_heads=2,
                      intermediate_size=128, dropout=0.0, input_size=40, num_mem_tokens=2, min_segments=1,
                      max_segments=1, stage_steps=120, eval_every=120, val_samples=96, batch_size=32, lr=3e-3,
                      warmup_steps=5, threshold=1.0, seed=0, progress=False)
    final = train(cfg)
    (ev,) = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if m["event"] == "eval"]
    assert set(ev["val_by_task"]) == {"memorize", "detect", "reasoning"}

    # Reasoning alone, on validation samples the run never saw: chance is 1/6 (about 20 of 120).
    model = RMTForSequenceClassification.from_pretrained(final)
    gen = T.TaskGenerator("reasoning", T.load_tokenizer(final), model.config, split="validation", seed=99)
    docs, labels = gen.batch(1, range(120))
    correct = int((predict(model, docs, batch_size=60).argmax(-1) == labels).sum())
    assert correct >= 36, f"Reasoning {correct}/120 after 120 mixed steps; chance is 20/120"


def _tiny(tmp_path, **kw):
    return TrainConfig(out_dir=str(tmp_path / "run"), backbone=BERT_CASED, random_init=True, num_layers=1,
                       hidden_size=32, num_heads=2, intermediate_size=64, input_size=40, num_mem_tokens=2,
                       min_segments=1, max_segments=1, stage_steps=4, eval_every=2, val_samples=8, batch_size=4,
                       progress=False, **kw)


def test_select_on_picks_the_best_and_the_threshold_by_those_tasks(tmp_path, monkeypatch):
    """Validation says memorize 8/8 and reasoning 0/8 at step 2, memorize 7/8 and reasoning 8/8 at step 4."""
    import rmt_fast.train as train_module

    answers = iter([{"memorize": (8, 8), "reasoning": (0, 8)}, {"memorize": (7, 8), "reasoning": (8, 8)}])
    monkeypatch.setattr(train_module, "validation_counts", lambda *a, **k: next(answers))
    cfg = _tiny(tmp_path, task=("memorize", "reasoning"), select_on=("memorize",), threshold=1.0)
    train(cfg)
    ms = read_metrics(tmp_path / "run" / "metrics.jsonl")
    evals = [m for m in ms if m["event"] == "eval"]
    assert [e["val_accuracy"] for e in evals] == [1.0]            # memorize alone decides: threshold met
    assert evals[0]["val_by_task"] == {"memorize": 1.0, "reasoning": 0.0}
    assert [m["reason"] for m in ms if m["event"] == "stage_end"] == ["threshold"]

    # Without --select-on both tasks count: 0.5 at step 2, 15/16 at step 4, the later one is the best.
    answers = iter([{"memorize": (8, 8), "reasoning": (0, 8)}, {"memorize": (7, 8), "reasoning": (8, 8)}])
    monkeypatch.setattr(train_module, "validation_counts", lambda *a, **k: next(answers))
    train(_tiny(tmp_path / "b", task=("memorize", "reasoning"), threshold=1.0))
    evals = [m for m in read_metrics(tmp_path / "b" / "run" / "metrics.jsonl") if m["event"] == "eval"]
    assert [e["val_accuracy"] for e in evals] == [0.5, 15 / 16] and evals[-1]["best"] == 15 / 16


def test_select_on_names_only_trained_tasks(tmp_path, capsys):
    from rmt_fast.cli import main

    assert main(["train", str(tmp_path / "r"), "--task", "memorize", "--select-on", "reasoning"]) == 2
    assert "--select-on" in capsys.readouterr().err


def test_validation_counts_each_task_separately(monkeypatch):
    """Right on every other sample by construction: each task's count is its own samples' count."""
    import rmt_fast.evaluate as evaluate_module
    from rmt_fast.config import RMTConfig
    from rmt_fast.train import validation_counts

    tok = T.load_tokenizer(BERT_CASED)
    cfg = T.task_config(RMTConfig(vocab_size=len(tok), input_size=64))
    gen = T.TaskGenerator(("memorize", "detect", "reasoning"), tok, cfg, split="validation", seed=4)
    samples = gen.samples(1, range(60))

    def fake_predict(model, docs, **kw):
        logits = torch.zeros(len(docs), len(T.LABEL_NAMES))
        for row, doc in enumerate(docs):
            i = next(j for j, s in enumerate(samples) if torch.equal(s.input_ids, doc))
            label = samples[i].label
            logits[row, label if i % 2 == 0 else (label + 1) % len(T.LABEL_NAMES)] = 1.0
        return logits

    monkeypatch.setattr(evaluate_module, "predict", fake_predict)
    counts = validation_counts(None, gen, 1, 60, 16, "cpu")
    want = {}
    for i, s in enumerate(samples):
        c, n = want.get(s.task, (0, 0))
        want[s.task] = (c + (i % 2 == 0), n + 1)
    assert counts == want and len(want) == 3
