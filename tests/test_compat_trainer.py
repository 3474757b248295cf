"""The compat class driven the way the reference's run scripts and ``Trainer`` drive it."""
import inspect

import torch

from compat_oracle import reference_forward_of
from rmt_fast.compat import RMTEncoderForSequenceClassification
from test_compat import batch, close, compat_model


def trainer_inputs(model, batch_dict):
    """The reference's Trainer passes only the batch keys that ``forward`` declares by name."""
    declared = inspect.signature(model.forward).parameters
    return {k: v for k, v in batch_dict.items() if k in declared}


def make_batch(lengths, with_labels=True):
    ids, mask = batch(lengths)
    b = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
         "target_text": ["kitchen"] * len(lengths), "id": torch.arange(len(lengths))}
    if with_labels:
        b["labels"] = torch.randint(0, 4, (len(lengths),))
    return b


def test_trainer_shaped_loop(tmp_path):
    model = compat_model(sum_loss=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    train_batches = [make_batch([40, 9, 60]) for _ in range(3)]
    eval_batch = make_batch([30, 7, 72])                      # 2, 1 and 4 segments: losses over subsets
    eval_short = make_batch([5, 17])                          # one segment: the Engine computes the loss
    predict_batch = make_batch([50, 11], with_labels=False)
    assert set(trainer_inputs(model, eval_batch)) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    log, previous = [], None
    for step in range(3):
        model.train()
        out = model(**trainer_inputs(model, train_batches[step]))
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        log.append({k: out[k].item() for k in out.keys() if "loss" in k})
        assert set(log[-1]) == {"loss", "loss_0", "loss_1", "loss_2", "loss_3"}
        assert abs(log[-1]["loss"] - sum(log[-1][f"loss_{i}"] for i in range(4)) / 4) < 1e-5

        model.eval()
        with torch.no_grad():
            outs = [model(**trainer_inputs(model, b)) for b in (eval_batch, eval_short, predict_batch)]
            wants = [reference_forward_of(model, b["input_ids"], b.get("labels")) for b in
                     (eval_batch, eval_short, predict_batch)]
        for out, want in zip(outs, wants):                    # eval logits follow the training
            assert close(out["logits"], want["logits"])
            for k in (k for k in want if "loss" in k):
                assert close(out[k], want[k]), k
        log.append({k: outs[0][k].item() for k in outs[0].keys() if "loss" in k})
        assert set(log[-1]) == {"loss", "loss_0", "loss_1", "loss_2", "loss_3"}
        if previous is not None:
            assert not torch.allclose(outs[2]["logits"], previous)
        previous = outs[2]["logits"]

    path = tmp_path / "model_best.pth"
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
                "iteration": 3}, path)
    restored = compat_model(sum_loss=True)
    restored.load_state_dict(torch.load(path, weights_only=True)["model_state_dict"], strict=True)
    with torch.no_grad():
        again = restored(**trainer_inputs(restored, predict_batch))
    assert torch.equal(again["logits"], previous)
    assert isinstance(restored, RMTEncoderForSequenceClassification)
