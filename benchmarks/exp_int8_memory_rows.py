"""Experiment (issue 18): are int8's label flips on long documents the memory rows' quantization?

The shipped model's Detect & Memorize test documents (seed 1234, as bench_int8.py drift), classified by
float32 (the reference), bf16, int8, and two int8 variants in which every int8 GEMM's output rows for
[CLS] and the memory tokens (rows 0..M of each segment) are recomputed in float32 from the same input:
  memw8:    with the int8 weights (dequantized): no activation quantization on those rows
  memexact: with the original float32 weights: neither weights nor activations quantized there
Prints label agreement with float32, the flipped documents and the logit gaps.
    OMP_NUM_THREADS=1 python benchmarks/exp_int8_memory_rows.py 1024 100
(It patches quant.Int8Linear for the run: an experiment, not an Engine option.)"""
import sys
from pathlib import Path

import torch
from transformers.activations import ACT2FN

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_int8 import drift_documents, flips, make_engine  # noqa: E402

from rmt_fast.engine import quant  # noqa: E402


def patch_memory_rows(T: int, M: int, mode: dict) -> None:
    """Int8Linear keeps float32 copies of its weight; with mode["rows"] set, its output rows 0..M of
    each T-row segment are recomputed in float32 from the unquantized input."""
    init, call = quant.Int8Linear.__init__, quant.Int8Linear.__call__

    def patched_init(self, weight, bias, act=None, out_dtype=torch.bfloat16, kernel=None):
        init(self, weight, bias, act, out_dtype, kernel)
        self._w32 = weight.detach().float().clone()                                    # [N, K]
        self._w8 = (self.qweight_t.float() * self.weight_scale).t().contiguous()       # [N, K]
        self._act_fn = (lambda y: y) if act is None else ACT2FN[act]

    def patched_call(self, x):                                                         # x: [B, T, K]
        y = call(self, x)
        if mode["rows"] is None or x.dim() != 3 or x.shape[1] != T:
            return y
        w = self._w32 if mode["rows"] == "memexact" else self._w8
        y[:, :M + 1] = self._act_fn(x[:, :M + 1].float() @ w.t() + self.bias).to(y.dtype)
        return y

    quant.Int8Linear.__init__, quant.Int8Linear.__call__ = patched_init, patched_call


def main() -> None:
    n_seg, n_docs = int(sys.argv[1]), int(sys.argv[2])
    model, ids, labels = drift_documents(n_seg, n_docs)
    mode = {"rows": None}
    patch_memory_rows(model.config.input_size, model.config.num_mem_tokens, mode)
    ref = make_engine(model, "float32").classify(ids, batch_size=n_docs)
    for name, variant, rows in [("bf16", "bfloat16", None), ("int8", "int8", None), ("memw8", "int8", "memw8"),
                                ("memexact", "int8", "memexact")]:
        mode["rows"] = rows
        logits = make_engine(model, variant).classify(ids, batch_size=n_docs)
        print(f"{n_seg} seg {name}: {flips(logits, ref, labels)}", flush=True)


if __name__ == "__main__":
    main()
