"""A quick probe of which backbone learns Reasoning (bAbI qa4) at all: no memory, no recurrence.

Each sample is one 27-token Reasoning text (`rmt_fast.tasks`, both facts and the question, a few words of
background) as ``[CLS] text [SEP]`` through a plain ``BertForSequenceClassification`` trained on the 6
labels. It separates "can this backbone learn the task's two-step lookup" from "can the memory carry the
facts", in minutes. docs/TRAINING.md ("The three-task default model") has what each backbone gave.

    python scripts/reasoning_probe.py minilm --layers 6       # pretrained MiniLM, all 6 layers
    python scripts/reasoning_probe.py minilm --layers 3       # its first 3 layers
    python scripts/reasoning_probe.py random                  # 3 random layers, hidden 128 (bert-base-cased vocab)
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification

from rmt_fast import tasks as T
from rmt_fast.backbones import resolve_backbone_path

BERT_CASED = Path(__file__).resolve().parents[1] / "rmt_fast" / "data" / "bert-base-cased"


class _Layout:
    segment_size = 27          # the three-task model's segment: input_size 40 - 10 memory - 3 specials


def texts(tokenizer, split: str, n: int, seed: int):
    """[n, 29] token ids ([CLS] text [SEP]) and [n] labels of Reasoning samples of one segment."""
    gen = T.TaskGenerator("reasoning", tokenizer, _Layout, split=split, seed=seed)
    samples = [gen.sample(1, i) for i in range(n)]
    ids = [[tokenizer.cls_token_id, *s.input_ids.tolist(), tokenizer.sep_token_id] for s in samples]
    return torch.tensor(ids), torch.tensor([s.label for s in samples])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("backbone", choices=["minilm", "random"])
    p.add_argument("--layers", type=int, default=None, help="minilm: keep the first k layers (default 6); random: 3")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    if args.backbone == "minilm":
        path = resolve_backbone_path("minilm")
        tokenizer = T.load_tokenizer(path)
        model = BertForSequenceClassification.from_pretrained(
            path, num_labels=6, num_hidden_layers=args.layers or 6, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)
    else:
        tokenizer = T.load_tokenizer(BERT_CASED)
        model = BertForSequenceClassification(BertConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=128, num_hidden_layers=args.layers or 3,
            num_attention_heads=4, intermediate_size=512, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, num_labels=6, max_position_embeddings=64))
    train_x, train_y = texts(tokenizer, "train", 20000, args.seed)
    val_x, val_y = texts(tokenizer, "validation", 512, args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    t0 = time.time()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0:
            model.eval()
            with torch.no_grad():
                acc = (model(input_ids=val_x).logits.argmax(-1) == val_y).float().mean().item()
            print(f"step {step}: validation {100 * acc:.1f}% ({time.time() - t0:.0f} s)", flush=True)
            model.train()
        if step == args.steps:
            break
        idx = torch.randint(len(train_x), (args.batch_size,))
        loss = F.cross_entropy(model(input_ids=train_x[idx]).logits, train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        warmup.step()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
