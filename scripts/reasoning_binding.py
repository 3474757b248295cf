"""Does a model bind each Reasoning fact's place to its own direction? (docs/TRAINING.md, issue 15)

    python scripts/reasoning_binding.py MODEL_DIR OUT.json [SAMPLES]

For SAMPLES validation samples at 1 segment (seed 1), the mean attention, per layer and head, from each
fact's direction word (`The {a} is {dir} of the {b}.`) to its own fact's place {a} and to the other fact's
place. A model that binds them looks at its own place more; one that only knows "one of the two places"
looks at both alike. Also the model's accuracy on those samples.
"""
import json
import sys

import torch

from rmt_fast import files
from rmt_fast import tasks as T
from rmt_fast.model import RMTForSequenceClassification


def fact_positions(samples, text_start: int):
    """(sample row, direction, own place, other place) positions in the 1-segment layout, two per sample.

    In a fact's tokens (The, a, is, dir, of, the, b, .) the place is at +1 and the direction at +3.
    """
    rows = []
    for b, s in enumerate(samples):
        (f1, _), (f2, _) = s.fact_spans
        for mine, other in ((f1, f2), (f2, f1)):
            rows.append((b, text_start + mine + 3, text_start + mine + 1, text_start + other + 1))
    return torch.tensor(rows)                                      # [2 * samples, 4]


def binding(model, tokenizer, n_samples: int) -> dict:
    samples = T.TaskGenerator("reasoning", tokenizer, model.config, split="validation",
                              seed=1).samples(1, range(n_samples))
    captured = {}
    segment_forward = model.segment_forward

    def keep_attentions(ids, memory, output_attentions=False):
        out = segment_forward(ids, memory, output_attentions=True)
        captured["attentions"] = out.attentions             # per layer [B, heads, T, T]
        return out

    model.segment_forward = keep_attentions
    try:
        with torch.no_grad():
            logits = model([s.input_ids for s in samples]).logits
    finally:
        del model.segment_forward
    labels = torch.tensor([s.label for s in samples])
    text_start = model.config.input_size - model.config.segment_size - 1  # [CLS] memory [SEP] come first
    pos = fact_positions(samples, text_start)
    heads = []
    for layer, att in enumerate(captured["attentions"]):
        to_own = att[pos[:, 0], :, pos[:, 1], pos[:, 2]].mean(0)       # [heads]
        to_other = att[pos[:, 0], :, pos[:, 1], pos[:, 3]].mean(0)
        heads += [{"layer": layer, "head": h, "own_place": round(float(to_own[h]), 4),
                   "other_place": round(float(to_other[h]), 4)} for h in range(att.shape[1])]
    return {"samples": n_samples, "accuracy": float((logits.argmax(-1) == labels).float().mean()), "heads": heads}


def main(argv) -> None:
    model_dir, out = argv[0], argv[1]
    n_samples = int(argv[2]) if len(argv) > 2 else 256
    torch.set_num_threads(1)
    model = RMTForSequenceClassification.from_pretrained(model_dir).eval()
    result = {"model": model_dir, **binding(model, T.load_tokenizer(model_dir), n_samples)}
    files.write_text(out, json.dumps(result, indent=1) + "\n")
    for h in result["heads"]:
        print(f"layer {h['layer']} head {h['head']}: own place {h['own_place']:.3f}, "
              f"other place {h['other_place']:.3f}")
    print(f"accuracy {result['accuracy']:.3f} on {n_samples} validation samples")


if __name__ == "__main__":
    main(sys.argv[1:])
