"""bf16 against fp32 labels through the Engine on the same test samples at one length (docs/RESULTS.md).

    python scripts/bf16_agreement.py MODEL_DIR N_SEGMENTS SAMPLES OUT.json

The samples are the first SAMPLES test samples of seed 1234 for each task, the ones `rmt-fast evaluate`
draws first at that length.
"""
import json
import sys
import time

import torch

from rmt_fast import files
from rmt_fast import tasks as T
from rmt_fast.engine import Engine
from rmt_fast.model import RMTForSequenceClassification

model_dir, n_segments, samples, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(1)
model = RMTForSequenceClassification.from_pretrained(model_dir)
tok = T.load_tokenizer(model_dir)
fp32, bf16 = Engine(model, dtype="float32"), Engine(model, dtype=torch.bfloat16)
rows = []
for task in ("memorize", "detect", "reasoning"):
    t0 = time.time()
    docs, labels = T.TaskGenerator(task, tok, model.config, split="test", seed=1234).batch(n_segments, range(samples))
    a = fp32.classify(docs, batch_size=samples).argmax(-1)
    b = bf16.classify(docs, batch_size=samples).argmax(-1)
    rows.append({"task": task, "segments": n_segments, "samples": samples, "agree": int((a == b).sum()),
                 "fp32_correct": int((a == labels).sum()), "bf16_correct": int((b == labels).sum()),
                 "seconds": round(time.time() - t0, 1)})
    print(rows[-1], flush=True)
files.write_text(out, json.dumps(rows, indent=1))
