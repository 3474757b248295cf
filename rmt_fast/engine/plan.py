"""The model turned into an inference plan: fused QKV weights, a pruned last layer, one dtype.

A plan holds plain tensors, not modules, and computes one segment step for a batch:
embed (memory injected at rows 1..M) -> layers -> last layer on the rows that are read only
([CLS] and the memory rows) -> new memory and logits.

Precision: matmuls and attention run in the plan's dtype. The embedding sum and its LayerNorm run
in float32 from float32 tables, and the memory state is carried in float32 between segments (the
last layer's memory rows are rounded to the compute dtype once, then up-cast), so rounding does not
compound through the embedding of thousands of segments.

Threads: a plan is shared by every call of its Engine, so ``step`` keeps nothing per call in the plan
(each call's buffers are its own). The only state it writes is ``_chosen``, the attention backend of
each (layer, masked) variant, chosen once: a deterministic choice, so two threads racing on it write
the same value.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import _ext
from ..model import RMTForSequenceClassification
from . import backends
from .linear import Linear, packing_available
from .quant import check_quantize, int8_attention, int8_gemms, make_linear


@dataclass
class LayerWeights:
    qkv: Optional[Linear]      # [3H, H], query rows pre-scaled; None in the last layer, which uses
    q: Optional[Linear]        # the query and key/value projections apart (queries on a few rows only)
    kv: Optional[Linear]
    out: Linear
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    ffn_in: Linear             # the activation included (fused into the GEMM where oneDNN can)
    ffn_out: Linear
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor


def _check_supported(model: RMTForSequenceClassification) -> None:
    bconf = model.model.config
    problems = []
    if getattr(bconf, "position_embedding_type", "absolute") != "absolute":
        problems.append(f"position_embedding_type={bconf.position_embedding_type!r} (only 'absolute')")
    if getattr(bconf, "is_decoder", False):
        problems.append("is_decoder=True")
    bert = model.bert
    if not all(hasattr(bert, a) for a in ("embeddings", "encoder")) or getattr(bert, "pooler", None) is None:
        problems.append(f"{type(bert).__name__} is not a BERT-style encoder with a pooler")
    if problems:
        raise ValueError("the engine supports BERT-family backbones only: " + "; ".join(problems))


class InferencePlan:
    """Weights of ``model`` laid out for fast inference on ``device`` in ``dtype``.

    The model is only read (no mode switch, no in-place change). Tensors already in the wanted dtype
    and device are used as they are, not copied: an in-place change of the model reaches them, which
    is why the Engine rebuilds its plan on any change (``source_watch.py``). An explicitly named
    ``attention`` backend that cannot run this model here raises RuntimeError now.
    """

    def __init__(self, model: RMTForSequenceClassification, device: torch.device, dtype: torch.dtype,
                 attention: str = "auto", packed_weights: Optional[bool] = None, quantize: Optional[str] = None):
        _check_supported(model)
        self.config = model.config
        self.device, self.dtype, self.attention = device, dtype, attention
        bconf = model.model.config
        self.num_heads = bconf.num_attention_heads
        self.hidden = bconf.hidden_size
        self.head_dim = self.hidden // self.num_heads
        self.eps = bconf.layer_norm_eps
        # oneDNN pre-packed weights: by default wherever they run (CPU, float32/bfloat16).
        why_not = packing_available(device, dtype)
        if packed_weights and why_not:
            raise ValueError(f"packed_weights=True is not possible here: {why_not}")
        self.packed_weights = why_not is None if packed_weights is None else bool(packed_weights)
        self.packed_weights_status = "on (oneDNN)" if self.packed_weights else f"off: {why_not or 'turned off'}"
        self.quantize, self.quantize_status = quantize, check_quantize(quantize, device, dtype)   # raises where it cannot run

        def f32(t):
            return t.detach().to(device=device, dtype=torch.float32).contiguous()

        def low(t):
            return t.detach().to(device=device, dtype=dtype).contiguous()

        emb = model.bert.embeddings
        self.word_emb = f32(emb.word_embeddings.weight)
        self.pos_emb = f32(emb.position_embeddings.weight)
        self.type_emb0 = f32(emb.token_type_embeddings.weight[0])
        self.emb_ln_w, self.emb_ln_b = f32(emb.LayerNorm.weight), f32(emb.LayerNorm.bias)
        with torch.no_grad():
            self.initial_memory = f32(model.initial_memory())                            # [M, H]

        self.layers: List[LayerWeights] = []
        # The softmax scale is folded into the query projection (in float32, before any rounding), so
        # attention runs with scale 1 and no pass over the scores multiplies them.
        scale = self.head_dim ** -0.5
        pack, act, H = self.packed_weights, bconf.hidden_act, self.hidden
        last = len(model.bert.encoder.layer) - 1
        for i, layer in enumerate(model.bert.encoder.layer):
            sa, ao = layer.attention.self, layer.attention.output
            qkv_w = low(torch.cat([sa.query.weight.float() * scale, sa.key.weight, sa.value.weight]))
            qkv_b = low(torch.cat([sa.query.bias.float() * scale, sa.key.bias, sa.value.bias]))
            split = i == last

            def lin(name, w, b, act=None, i=i):  # int8 (quant.py) where quantize chose it, else Linear
                return make_linear(self.quantize, name, i == last, w, b, act, pack, dtype)
            self.layers.append(LayerWeights(
                qkv=None if split else lin("qkv", qkv_w, qkv_b),
                q=lin("q", qkv_w[:H], qkv_b[:H]) if split else None,     # row slices: contiguous
                kv=lin("kv", qkv_w[H:], qkv_b[H:]) if split else None,
                out=lin("out", low(ao.dense.weight), low(ao.dense.bias)),
                ln1_w=low(ao.LayerNorm.weight), ln1_b=low(ao.LayerNorm.bias),
                ffn_in=lin("ffn_in", low(layer.intermediate.dense.weight), low(layer.intermediate.dense.bias), act),
                ffn_out=lin("ffn_out", low(layer.output.dense.weight), low(layer.output.dense.bias)),
                ln2_w=low(layer.output.LayerNorm.weight), ln2_b=low(layer.output.LayerNorm.bias)))
        self.int8_gemms = int8_gemms(self.layers)                                       # ['layer 0 qkv', ...]
        self.int8_attention = [quantize == "int8" and int8_attention(i == last) for i in range(last + 1)]
        self.pooler_w, self.pooler_b = low(model.bert.pooler.dense.weight), low(model.bert.pooler.dense.bias)
        classifier = model.model.classifier
        self.cls_w, self.cls_b = low(classifier.weight), low(classifier.bias)
        self._chosen: Dict[Tuple[int, bool], str] = {}        # (layer, masked) -> the backend that ran
        if attention != "auto":
            self._check_attention()

    def _check_attention(self) -> None:
        """An explicitly requested backend that cannot run this model here fails now, not mid-run."""
        T, M, heads, d = self.config.input_size, self.config.num_mem_tokens, self.num_heads, self.head_dim
        kv = torch.zeros(1, T, heads, d, device=self.device, dtype=self.dtype)
        key_lengths = torch.full((1,), T, dtype=torch.int64, device=self.device)
        for rows in (T, M + 1):                                    # every layer's queries; the last layer's
            for lengths in (None, key_lengths):
                backends.select(self.attention, kv[:, :rows], kv, kv, lengths)

    # -- what ran ---------------------------------------------------------------------------------
    @property
    def attention_report(self) -> List[Dict[str, str]]:
        """Per layer, the attention backend each variant actually ran: {'unmasked'/'masked': name}."""
        report: List[Dict[str, str]] = [{} for _ in self.layers]
        for (layer, masked), name in sorted(self._chosen.items()):
            report[layer]["masked" if masked else "unmasked"] = name
        return report

    def describe(self) -> dict:
        """What this plan runs: device, dtype, linear layers and the attention of each layer so far."""
        return {"device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "packed_weights": self.packed_weights_status, "attention_requested": self.attention,
                "attention": self.attention_report}

    # -- pieces -----------------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """ids: [B, T] int64; memory: [B, M, H] float32 -> [B, T, H] in the plan's dtype."""
        # A fresh output per call: a buffer kept in the plan would be shared by concurrent calls.
        out = torch.empty(*ids.shape, self.hidden, device=self.device, dtype=self.dtype)
        return _ext.segment_embed(ids, memory, self.word_emb, self.pos_emb, self.type_emb0,
                                  self.emb_ln_w, self.emb_ln_b, self.eps, out)

    def _attend(self, index: int, q, k, v, key_lengths):
        key = (index, key_lengths is not None)
        if self.int8_attention[index]:
            self._chosen[key] = "cpp_int8"
            return _ext.attention_int8(q, k, v, key_lengths, scale=1.0)
        name = self._chosen.get(key)
        if name is None:
            name = self._chosen[key] = backends.select(self.attention, q, k, v, key_lengths)
        return backends.attention(name, q, k, v, key_lengths, scale=1.0)

    def _finish_layer(self, w: LayerWeights, attn, residual):
        h = F.layer_norm(w.out(attn) + residual, (self.hidden,), w.ln1_w, w.ln1_b, self.eps)
        f = w.ffn_out(w.ffn_in(h))
        return F.layer_norm(f + h, (self.hidden,), w.ln2_w, w.ln2_b, self.eps)

    def layer(self, index: int, x, key_lengths):
        w = self.layers[index]
        B, T, _ = x.shape
        qkv = w.qkv(x).view(B, T, 3, self.num_heads, self.head_dim)
        attn = self._attend(index, qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], key_lengths)
        return self._finish_layer(w, attn, x)

    def last_layer(self, x, key_lengths, rows: int):
        """The last layer for the first ``rows`` query rows only; keys and values over the whole block."""
        index = len(self.layers) - 1
        w = self.layers[index]
        B, T, H = x.shape
        q = w.q(x[:, :rows]).view(B, rows, self.num_heads, self.head_dim)
        kv = w.kv(x).view(B, T, 2, self.num_heads, self.head_dim)
        attn = self._attend(index, q, kv[:, :, 0], kv[:, :, 1], key_lengths)
        return self._finish_layer(w, attn, x[:, :rows])

    # -- one step ---------------------------------------------------------------------------------
    def step(self, ids: torch.Tensor, memory: torch.Tensor, key_lengths: Optional[torch.Tensor]):
        """One segment for a batch.

        ids: [B, T] int64; memory: [B, M, H] float32; key_lengths: [B] int64, or None when no segment
        in the batch has padding. Returns (logits [B, num_labels] float32, new memory [B, M, H] in the
        plan's dtype).
        """
        M = self.config.num_mem_tokens
        x = self.embed(ids, memory)
        for index in range(len(self.layers) - 1):
            x = self.layer(index, x, key_lengths)
        read = self.last_layer(x, key_lengths, rows=M + 1)                               # [B, 1 + M, H]
        pooled = torch.tanh(F.linear(read[:, 0], self.pooler_w, self.pooler_b))
        logits = F.linear(pooled, self.cls_w, self.cls_b).float()
        return logits, read[:, 1:]
