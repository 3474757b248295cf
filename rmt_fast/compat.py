"""A drop-in for the reference implementation's ``RMTEncoderForSequenceClassification``.

Swap one import line::

    # from modeling_rmt import RMTEncoderForSequenceClassification
    from rmt_fast.compat import RMTEncoderForSequenceClassification

The constructor takes the reference's arguments, ``load_state_dict`` takes the reference's state dicts,
``forward(input_ids=..., labels=...)`` returns an output with ``logits`` (and ``loss``). In training
mode it runs the plain-PyTorch model (autograd); in eval mode the fast Engine.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import SequenceClassifierOutput

from .config import RMTConfig
from .engine import Engine
from .model import RMTForSequenceClassification

_IGNORED_OK = {"drop_empty_segments", "padding_side", "segment_ordering", "backbone_cls", "model_attr"}


class RMTEncoderForSequenceClassification(RMTForSequenceClassification):
    def __init__(self, base_model, num_mem_tokens, tokenizer, input_size=512, max_n_segments=1, bptt_depth=-1,
                 sum_loss=False, segment_alignment="right", **other):
        unknown = sorted(set(other) - _IGNORED_OK)
        if unknown:
            warnings.warn(f"RMTEncoderForSequenceClassification ignores the arguments {unknown}", stacklevel=2)
        vocab = base_model.config.vocab_size
        config = RMTConfig(vocab_size=vocab, num_mem_tokens=num_mem_tokens, input_size=input_size,
                           max_n_segments=max_n_segments, bptt_depth=bptt_depth, sum_loss=sum_loss,
                           segment_alignment=segment_alignment or "right",
                           cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id,
                           pad_token_id=tokenizer.pad_token_id, num_labels=base_model.config.num_labels)
        base_model.resize_token_embeddings(vocab + num_mem_tokens)
        super().__init__(config, base_model)
        self._engine = None

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        state = dict(state_dict.get("model_state_dict", state_dict))
        state.pop("model.bert.embeddings.position_ids", None)
        state.pop("model.embeddings.weight", None)  # the reference's alias of the word embeddings
        return super().load_state_dict(state, strict=strict, assign=assign)

    def _fast(self) -> Engine:
        # The Engine notices changed weights itself; it computes in one device and dtype: the model's.
        device = self.mem_token_ids.device
        dtype = next(self.model.parameters()).dtype
        if self._engine is None or (self._engine.device, self._engine.dtype) != (device, dtype):
            self._engine = Engine(self, device=device, dtype=dtype)
        return self._engine

    def forward(self, input_ids=None, labels=None, attention_mask=None, **unused):
        if self.training or (labels is not None and self.config.sum_loss):
            out = super().forward(input_ids, labels=labels)
            return SequenceClassifierOutput(loss=out.loss, logits=out.logits)
        logits = self._fast().classify(list(input_ids), batch_size=len(input_ids))
        logits = logits.to(self.mem_token_ids.device)
        loss = None if labels is None else F.cross_entropy(logits, labels.to(logits.device))
        return SequenceClassifierOutput(loss=loss, logits=logits)
