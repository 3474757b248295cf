"""Experiment (issue 18): do asymmetric (zero-point) activation scales remove int8's label flips?

int8 quantizes each token's activations symmetrically (scale = max|x| / 127). The FFN's second GEMM reads
GELU outputs, which lie in [-0.17, max]: half of the int8 range goes unused there. Asymmetric per-token
quantization (uint8, scale = (max - min) / 255, a zero point per token) doubles the resolution of such
rows. This emulates it in float32 (the integer product is exact in float32 for these sizes up to rounding
far below the quantization step) with the model's int8 weights, and reports, as exp_int8_memory_rows.py,
label agreement with float32 on the shipped (two-task) model's Detect & Memorize documents:
  asym-ffn2: asymmetric activations for the FFN output GEMM only (input = GELU output)
  asym-all:  for every int8 GEMM
  int8-f32, asym-all-f32: the same with float32 (not bf16) everywhere else: int8's own error
    OMP_NUM_THREADS=1 python benchmarks/exp_int8_asymmetric.py 1024 100 [VARIANT,...]
(It patches quant.Int8Linear for the run: an experiment. What it found is now built: float32 plans quantize
activations asymmetrically in the kernels; bench_int8.py's int8-f32 runs them, int8-f32-sym the old scheme,
which is what this script's int8-f32 rows patch.)"""
import sys
from pathlib import Path

import torch
from transformers.activations import ACT2FN

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_int8 import drift_documents, flips, make_engine  # noqa: E402

from rmt_fast.engine import quant  # noqa: E402


def asymmetric_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] float32 -> the same, each row quantized to 256 levels between its min and max."""
    lo = x.amin(-1, keepdim=True).clamp(max=0.0)
    hi = x.amax(-1, keepdim=True).clamp(min=0.0)
    scale = ((hi - lo) / 255.0).clamp(min=1e-12)
    zero = torch.round(-lo / scale)                                                 # in [0, 255]
    q = torch.clamp(torch.round(x / scale) + zero, 0, 255)
    return (q - zero) * scale


def patch(mode: dict, ffn_inner: int) -> None:
    """With mode["asym"] set, Int8Linear computes y = act(asym(x) @ W8^T + b) in float32 instead."""
    init, call = quant.Int8Linear.__init__, quant.Int8Linear.__call__

    def patched_init(self, weight, bias, act=None, out_dtype=torch.bfloat16, kernel=None, **kw):
        init(self, weight, bias, act, out_dtype, kernel, **kw)
        self._w8 = (self.qweight_t.float() * self.weight_scale).t().contiguous()       # [N, K]
        self._act_fn = (lambda y: y) if act is None else ACT2FN[act]
        self._is_ffn2 = weight.shape[1] == ffn_inner

    def patched_call(self, x):                                                         # x: [..., K]
        if mode["asym"] is None or (mode["asym"] == "ffn2" and not self._is_ffn2):
            return call(self, x)
        y = self._act_fn(asymmetric_rows(x.float()) @ self._w8.t() + self.bias)
        return y.to(self.out_dtype)

    quant.Int8Linear.__init__, quant.Int8Linear.__call__ = patched_init, patched_call


def main() -> None:
    n_seg, n_docs = int(sys.argv[1]), int(sys.argv[2])
    model, ids, labels = drift_documents(n_seg, n_docs)
    mode = {"asym": None}
    patch(mode, model.model.config.intermediate_size)
    ref = make_engine(model, "float32").classify(ids, batch_size=n_docs)
    runs = [("int8", "int8", None), ("asym-ffn2", "int8", "ffn2"), ("asym-all", "int8", "all"),
            ("int8-f32", "int8-f32-sym", None), ("asym-all-f32", "int8-f32-sym", "all")]
    chosen = sys.argv[3].split(",") if len(sys.argv) > 3 else [r[0] for r in runs]
    for name, variant, asym in (r for r in runs if r[0] in chosen):
        mode["asym"] = asym
        logits = make_engine(model, variant).classify(ids, batch_size=n_docs)
        print(f"{n_seg} seg {name}: {flips(logits, ref, labels)}", flush=True)


if __name__ == "__main__":
    main()
