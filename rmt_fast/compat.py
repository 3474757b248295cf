"""Drop-ins for the reference implementation's classes (``modeling_rmt``), whole API included.

Swap one import line::

    # from modeling_rmt import RMTEncoderForSequenceClassification
    from rmt_fast.compat import RMTEncoderForSequenceClassification
    # --model_cls modeling_rmt.experimental:RMTEncoderCPUOffload  ->  rmt_fast.compat:RMTEncoderCPUOffload

The constructor, ``forward``'s signature and outputs (``loss``, ``loss_i``, ``hidden_states_i``,
``attentions_i``), the state dict (alias key included) and the loss rules are the reference's.
``forward`` takes the fast Engine when it gives the reference's answer, and the plain-PyTorch model
(``RMTForSequenceClassification.forward``, autograd) otherwise; see ``fast_path_dtype`` for the rule.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from transformers.modeling_outputs import SequenceClassifierOutput

from .config import RMTConfig
from .engine import Engine
from .model import RMTForSequenceClassification, classification_loss

# The reference's constructor arguments that change nothing here (its run scripts pass some of them).
_NO_EFFECT = {"drop_empty_segments", "padding_side", "segment_ordering", "backbone_cls", "model_attr"}
# Features of the reference's other classes that its run scripts always pass, with their "off" value:
# accepted when off, refused otherwise (this class does not do them).
_OFF = {"memory_forward_func": None, "memory_layers": None, "share_memory_layers": False,
        "reconstruction_loss_coef": None}
# Dtypes the Engine runs in, per device type.
_ENGINE_DTYPES = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.float32, torch.bfloat16, torch.float16)}
_ALIAS = "model.embeddings.weight"
_WORD_EMBEDDINGS = "model.bert.embeddings.word_embeddings.weight"


class RMTEncoderForSequenceClassification(RMTForSequenceClassification):
    """The reference's encoder classifier: the last segment's output, ``loss_i`` for every segment."""

    _last_segment_only = False   # RMTEncoderCPUOffload keeps only the last segment's outputs

    def __init__(self, base_model, num_mem_tokens, tokenizer, input_size=512, max_n_segments=1, bptt_depth=-1,
                 sum_loss=False, segment_alignment="right", **other):
        refused = {k: v for k, v in other.items() if k in _OFF and v != _OFF[k]}
        if refused:
            raise ValueError(f"{type(self).__name__} does not implement {refused}; leave these arguments at "
                             f"{ {k: _OFF[k] for k in refused} } (the reference's encoder classifier does too)")
        unknown = sorted(set(other) - _NO_EFFECT - set(_OFF))
        if unknown:
            warnings.warn(f"{type(self).__name__} ignores the arguments {unknown}", stacklevel=2)
        vocab = base_model.config.vocab_size
        config = RMTConfig(vocab_size=vocab, num_mem_tokens=num_mem_tokens, input_size=input_size,
                           max_n_segments=max_n_segments, bptt_depth=bptt_depth, sum_loss=sum_loss,
                           segment_alignment=segment_alignment or "right",
                           cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id,
                           pad_token_id=tokenizer.pad_token_id, num_labels=base_model.config.num_labels)
        base_model.resize_token_embeddings(vocab + num_mem_tokens)
        super().__init__(config, base_model)
        # The reference registers this alias of the word embeddings, hence its state-dict key.
        self.model.embeddings = self.model.get_input_embeddings()
        self._engine: Optional[Engine] = None   # not module state: kept out of state_dict, copies, pickles

    # -- module state -----------------------------------------------------------------------------
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_engine"] = None   # packed weights cannot be copied or pickled; rebuilt on the next use
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """The reference's state dicts (alias key or not, old ``position_ids`` buffer or not)."""
        state = dict(state_dict.get("model_state_dict", state_dict))
        state.pop("model.bert.embeddings.position_ids", None)
        if _ALIAS in state and _WORD_EMBEDDINGS in state and not torch.equal(state[_ALIAS], state[_WORD_EMBEDDINGS]):
            raise ValueError(f"'{_ALIAS}' should alias '{_WORD_EMBEDDINGS}' but differs from it")
        for key, twin in ((_ALIAS, _WORD_EMBEDDINGS), (_WORD_EMBEDDINGS, _ALIAS)):
            if key not in state and twin in state:
                state[key] = state[twin]
        return super().load_state_dict(state, strict=strict, assign=assign)

    # -- which path -------------------------------------------------------------------------------
    def fast_path_dtype(self, input_ids, labels=None, output_attentions=None,
                        output_hidden_states=None) -> Optional[torch.dtype]:
        """The dtype the Engine would run this call in, or None when only the plain path gives the
        reference's answer: in train mode, when autograd is on and a parameter requires grad, when
        hidden states or attentions are asked for, or in a dtype the Engine does not run in (float64;
        float16 on the CPU). With labels the Engine gives every segment's logits (``per_segment``)."""
        if self.training or output_attentions or output_hidden_states:
            return None
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            return None
        param = self.model.classifier.weight
        dtype = param.dtype
        if torch.is_autocast_enabled(param.device.type) and dtype == torch.float32:
            dtype = torch.get_autocast_dtype(param.device.type)
        if dtype not in _ENGINE_DTYPES.get(param.device.type, ()):
            return None
        return dtype

    def _fast(self, dtype: torch.dtype) -> Engine:
        device = self.mem_token_ids.device
        engine = self._engine
        if engine is None or engine.device != device or engine.dtype != dtype:
            engine = Engine(self, device=device, dtype=dtype)
            self._engine = engine   # the Engine itself rebuilds when the weights change
        return engine

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, head_mask=None,
                inputs_embeds=None, labels=None, output_attentions=None, output_hidden_states=None,
                return_dict=None):
        """The reference's forward. attention_mask, token_type_ids, inputs_embeds and head_mask have no
        effect there (each segment's mask and type ids are rebuilt from its ids) and none here."""
        if position_ids is not None:
            raise ValueError("position_ids is not supported: each segment uses positions 0..input_size-1 "
                             "(the reference passes position_ids to every segment unchanged)")
        if return_dict is False:
            raise ValueError("return_dict=False is not supported: the output is a SequenceClassifierOutput "
                             "(the reference fails with return_dict=False too)")
        dtype = self.fast_path_dtype(input_ids, labels, output_attentions, output_hidden_states)
        if dtype is None:
            return self._plain(input_ids, labels, bool(output_attentions), bool(output_hidden_states))
        return self._engine_forward(input_ids, labels, dtype)

    def _engine_forward(self, input_ids, labels, dtype: torch.dtype) -> SequenceClassifierOutput:
        docs = list(input_ids)
        per_segment = labels is not None and not self._last_segment_only
        with warnings.catch_warnings():   # truncation past max_n_segments is the reference's rule, silently
            warnings.filterwarnings("ignore", message=".*exceed max_n_segments")
            # [B, C], or per document [n_segments_d, C]; inference tensors
            got = self._fast(dtype).classify(docs, batch_size=max(1, len(docs)), per_segment=per_segment)
        device = self.mem_token_ids.device
        if per_segment:   # copy=True: ordinary tensors even when device and dtype already match
            per_doc = [x.to(device=device, dtype=dtype, copy=True) for x in got]
            losses = _step_losses(self.model.config, per_doc, labels)
            logits = torch.stack([x[-1] for x in per_doc])                        # [B, C]
            loss = torch.stack(losses).mean() if self.config.sum_loss else losses[-1]
        else:
            logits = got.to(device=device, dtype=dtype, copy=True)
            loss = None if labels is None else classification_loss(self.model.config, logits, labels)
            losses = [] if loss is None else [loss]   # one step's, or only the last is kept (CPU offload)
        out = SequenceClassifierOutput(loss=loss, logits=logits)
        out["hidden_states"] = None   # the reference's key, emptied when not asked for
        for i, step_loss in enumerate(losses):
            out[f"loss_{i}"] = step_loss
        return out

    def _plain(self, input_ids, labels, output_attentions: bool, output_hidden_states: bool):
        r = super().forward(input_ids, labels=labels, output_hidden_states=output_hidden_states,
                            output_attentions=output_attentions, last_segment_only=self._last_segment_only)
        out = SequenceClassifierOutput(
            loss=r.loss, logits=r.logits,
            hidden_states=r.segment_hidden_states[-1] if output_hidden_states else None,
            attentions=r.segment_attentions[-1] if output_attentions else None)
        if not output_hidden_states:
            out["hidden_states"] = None
        n = max(len(r.segment_losses or ()), len(r.segment_hidden_states or ()), len(r.segment_attentions or ()))
        for i in range(n):   # the reference's key order: per segment, its loss, hidden states, attentions
            if labels is not None:
                out[f"loss_{i}"] = r.segment_losses[i]
            if output_hidden_states:
                out[f"hidden_states_{i}"] = r.segment_hidden_states[i]
            if output_attentions:
                out[f"attentions_{i}"] = r.segment_attentions[i]
        return out


def _step_losses(backbone_config, per_doc, labels):
    """The reference's loss per step, first to last: documents are right-aligned, so with N the most
    segments, document d (n_d segments) runs at steps N-n_d..N-1; step i's loss covers the documents
    there, in input order. per_doc: per document its logits [n_d, C] after each segment."""
    if len(labels) != len(per_doc):
        raise ValueError(f"{len(labels)} labels for {len(per_doc)} documents")
    counts = [len(x) for x in per_doc]
    n_steps = max(counts)
    labels = labels.to(per_doc[0].device)
    losses = []
    for step in range(n_steps):
        present = [d for d, n in enumerate(counts) if n >= n_steps - step]
        logits = torch.stack([per_doc[d][step - (n_steps - counts[d])] for d in present])    # [n, C]
        losses.append(classification_loss(backbone_config, logits, labels[present]))
    return losses


class RMTEncoderCPUOffload(RMTEncoderForSequenceClassification):
    """The reference's long-evaluation class (``modeling_rmt.experimental``): only the last segment's
    outputs are kept, so its output holds one ``loss_0`` (the last segment's) and memory stays flat."""

    _last_segment_only = True
