"""RMTForSequenceClassification: the reference's recurrent-memory classifier in plain PyTorch.

This module is the readable statement of the math and the training path; the fast engine
(``rmt_fast.engine``) compiles it into an inference plan and never changes it.

The memory enters in exactly one place, ``segment_forward``: the rows 1..M of the word-embedding output
are replaced by the current memory before BertEmbeddings adds position and token-type embeddings and
applies its LayerNorm; the new memory is the last layer's output at those rows. Losses follow Hugging
Face's ``problem_type`` rule (``classification_loss``), one per segment step, as the reference reports them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoints, segmentation
from .config import RMTConfig
from .inputs import as_documents


@dataclass
class RMTOutput:
    logits: torch.Tensor                 # [B, num_labels], from each document's last segment
    loss: Optional[torch.Tensor] = None  # the last segment's loss, or with sum_loss the mean of segment_losses
    memory: Optional[torch.Tensor] = None  # [B, M, H], the memory after the last segment
    # One entry per step that ran, first to last (only the last with last_segment_only=True):
    segment_losses: Optional[List[torch.Tensor]] = None     # with labels: the loss over the documents in it
    segment_hidden_states: Optional[List[tuple]] = None     # num_layers + 1 tensors [n_i, T, H]
    segment_attentions: Optional[List[tuple]] = None        # num_layers tensors [n_i, heads, T, T]


def classification_loss(backbone_config, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss of Hugging Face's ``*ForSequenceClassification``, by its ``problem_type`` rule.

    logits: [B, num_labels]; labels: [B] (integer classes or regression targets) or [B, num_labels]
    (float multi-label targets). As Hugging Face does, the first call fixes ``problem_type`` in the
    backbone's config: regression (MSE) for one label, cross-entropy for integer labels,
    BCE-with-logits otherwise.
    """
    num_labels = backbone_config.num_labels
    labels = labels.to(logits.device)
    if backbone_config.problem_type is None:
        if num_labels == 1:
            backbone_config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            backbone_config.problem_type = "single_label_classification"
        else:
            backbone_config.problem_type = "multi_label_classification"
    kind = backbone_config.problem_type
    if kind == "regression":
        return F.mse_loss(logits.squeeze(), labels.squeeze()) if num_labels == 1 else F.mse_loss(logits, labels)
    if kind == "single_label_classification":
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    if kind == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels)
    raise ValueError(f"the backbone's config has problem_type={kind!r}; expected 'regression', "
                     "'single_label_classification' or 'multi_label_classification'")


class RMTForSequenceClassification(nn.Module):
    """A Hugging Face BERT-family ``*ForSequenceClassification`` wrapped with recurrent memory.

    Attribute and buffer names follow the reference implementation, so its state-dict keys
    (``model.bert.*``, ``model.classifier.*``, ``cls_token``, ``sep_token``, ``mem_token_ids``) load as they are.
    """

    def __init__(self, config: RMTConfig, backbone: nn.Module):
        super().__init__()
        bconf = backbone.config
        expected_vocab = config.vocab_size + config.num_mem_tokens
        if bconf.vocab_size != expected_vocab:
            raise ValueError(
                f"backbone vocab_size is {bconf.vocab_size}, expected {config.vocab_size} tokenizer ids + "
                f"{config.num_mem_tokens} memory tokens = {expected_vocab}; build it with "
                f"RMTForSequenceClassification.from_backbone, which resizes the embeddings")
        if bconf.num_labels != config.num_labels:
            raise ValueError(f"backbone has {bconf.num_labels} labels, RMTConfig says {config.num_labels}")
        if bconf.max_position_embeddings < config.input_size:
            raise ValueError(f"input_size {config.input_size} exceeds the backbone's "
                             f"max_position_embeddings {bconf.max_position_embeddings}")
        self.config = config
        self.model = backbone
        self.register_buffer("cls_token", torch.tensor([config.cls_token_id]))
        self.register_buffer("sep_token", torch.tensor([config.sep_token_id]))
        self.register_buffer("mem_token_ids", torch.arange(config.vocab_size, expected_vocab))

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_backbone(cls, backbone: nn.Module, **rmt_kwargs) -> "RMTForSequenceClassification":
        """Wrap a pretrained classifier whose vocabulary is the tokenizer's: adds the memory rows."""
        vocab = backbone.config.vocab_size
        config = RMTConfig(vocab_size=vocab, num_labels=backbone.config.num_labels, **rmt_kwargs)
        backbone.resize_token_embeddings(vocab + config.num_mem_tokens)
        return cls(config, backbone)

    @classmethod
    def from_configs(cls, config: RMTConfig, backbone_config) -> "RMTForSequenceClassification":
        """A randomly initialised model: ``backbone_config`` is a transformers config of the base vocabulary."""
        from transformers import AutoModelForSequenceClassification

        bconf = backbone_config.__class__.from_dict(backbone_config.to_dict())
        bconf.vocab_size = config.vocab_size + config.num_mem_tokens
        bconf.num_labels = config.num_labels
        bconf._attn_implementation = "eager"
        return cls(config, AutoModelForSequenceClassification.from_config(bconf, attn_implementation="eager"))

    # -- pieces -----------------------------------------------------------------------------------
    @property
    def bert(self) -> nn.Module:
        return self.model.base_model

    def initial_memory(self) -> torch.Tensor:
        """[M, H]: the trained memory-token rows of the word embeddings."""
        return self.model.get_input_embeddings()(self.mem_token_ids)

    def segment_forward(self, ids: torch.Tensor, memory: torch.Tensor, output_attentions: bool = False):
        """One segment for a batch: the backbone's output (logits, hidden_states, attentions).

        ids: [B, T] laid out segments; memory: [B, M, H]. The new memory is
        ``out.hidden_states[-1][:, 1:M + 1]``.
        """
        M = self.config.num_mem_tokens
        words = self.model.get_input_embeddings()(ids)                        # [B, T, H]
        words = torch.cat([words[:, :1], memory.to(words.dtype), words[:, M + 1:]], dim=1)
        return self.model(inputs_embeds=words, attention_mask=(ids != self.config.pad_token_id).long(),
                          output_hidden_states=True, output_attentions=output_attentions)

    def segment_step(self, ids: torch.Tensor, memory: torch.Tensor, output_attentions: bool = False):
        """One segment for a batch. ids: [B, T] laid out segments; memory: [B, M, H].

        Returns (logits [B, num_labels], new memory [B, M, H], attentions or None).
        """
        out = self.segment_forward(ids, memory, output_attentions)
        new_memory = out.hidden_states[-1][:, 1:self.config.num_mem_tokens + 1]
        return out.logits, new_memory, (out.attentions if output_attentions else None)

    # -- the whole recurrence ---------------------------------------------------------------------
    def forward(self, input_ids, labels: Optional[torch.Tensor] = None, *, output_hidden_states: bool = False,
                output_attentions: bool = False, last_segment_only: bool = False) -> RMTOutput:
        """input_ids: [B, L] int tensor or a list of 1-D id sequences (special ids are removed anyway).

        Documents are right-aligned in steps, as in the reference: a shorter document starts later
        and every document ends on the last step. labels: [B] or [B, num_labels] (see
        ``classification_loss``); each step's loss covers the documents that have a segment in it.
        output_hidden_states / output_attentions: keep the backbone's per step (``segment_*``).
        last_segment_only: keep the per-step outputs of the last step only, so that memory stays flat
        with length (the reference's long-evaluation class).
        """
        cfg = self.config
        docs = segmentation.clean_and_truncate(as_documents(input_ids, cfg), cfg)
        empty = (docs.lengths == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"documents {empty} have no tokens left after removing special ids; "
                             "the reference gives them no segment and no logits")
        segs = segmentation.cut(docs, cfg)
        device = self.mem_token_ids.device
        n_steps = int(segs.count.max())
        step_of = n_steps - segs.count[segs.doc] + segs.index            # right-aligned step of each segment
        B = len(docs)
        if labels is not None and len(labels) != B:
            raise ValueError(f"{len(labels)} labels for {B} documents")
        memory = self.initial_memory().unsqueeze(0).expand(B, -1, -1)
        losses, hidden, attentions, logits = [], [], [], None
        for step in range(n_steps):
            sel = (step_of == step).nonzero().flatten()
            active = segs.doc[sel].to(device)
            ids = segmentation.layout(docs.tokens, segs.start[sel], segs.length[sel], cfg).to(device)
            mem_in = memory[active]
            if cfg.bptt_depth != -1 and step < n_steps - cfg.bptt_depth:
                mem_in = mem_in.detach()
            out = self.segment_forward(ids, mem_in, output_attentions)
            new_mem = out.hidden_states[-1][:, 1:cfg.num_mem_tokens + 1]
            memory = memory.index_copy(0, active, new_mem.to(memory.dtype))
            if last_segment_only:   # drop the previous step's outputs before keeping this one's
                losses, hidden, attentions = [], [], []
            if labels is not None:
                losses.append(classification_loss(self.model.config, out.logits, labels.to(device)[active]))
            if output_hidden_states:
                hidden.append(out.hidden_states)
            if output_attentions:
                attentions.append(out.attentions)
            logits = out.logits
        loss = None
        if labels is not None:
            loss = torch.stack(losses).mean() if cfg.sum_loss else losses[-1]
        return RMTOutput(logits=logits, loss=loss, memory=memory,
                         segment_losses=losses if labels is not None else None,
                         segment_hidden_states=hidden if output_hidden_states else None,
                         segment_attentions=attentions if output_attentions else None)

    # -- checkpoints (rmt_fast.checkpoints reads and writes the files) -------------------------
    @classmethod
    def _from_state(cls, config: RMTConfig, backbone_config, state: dict, source) -> "RMTForSequenceClassification":
        model = cls.from_configs(config, backbone_config)
        checkpoints.check_state_dict(model.state_dict(), state, str(source))
        model.load_state_dict(state)
        return model.eval()

    @classmethod
    def from_reference_checkpoint(cls, path, backbone_config, num_labels: Optional[int] = None,
                                  **rmt_kwargs) -> "RMTForSequenceClassification":
        """The reference implementation's ``model_best.pth`` (or a bare state dict).

        backbone_config: the backbone's transformers config (object, ``config.json`` path or directory),
        with the tokenizer's vocabulary size (as bert-base-cased's config.json) or the extended one.
        The memory-token count, tokenizer vocabulary, [CLS]/[SEP] ids and label count are read from the
        checkpoint itself; rmt_kwargs (input_size, segment_alignment, max_n_segments...) set the rest.
        """
        config, bconf, state = checkpoints.read_reference_checkpoint(path, backbone_config, num_labels,
                                                                     **rmt_kwargs)
        return cls._from_state(config, bconf, state, path)

    @classmethod
    def from_pretrained(cls, directory) -> "RMTForSequenceClassification":
        """A directory written by ``save_pretrained`` (safetensors + JSON)."""
        config, bconf, state = checkpoints.read_pretrained(directory)
        return cls._from_state(config, bconf, state, Path(directory) / "model.safetensors")

    @classmethod
    def load(cls, path, backbone_config=None, **rmt_kwargs) -> "RMTForSequenceClassification":
        """An rmt_fast directory, or a reference ``.pth`` file (which needs ``backbone_config``)."""
        p = Path(path)
        if p.is_dir():
            return cls.from_pretrained(p)
        if not p.is_file():
            raise FileNotFoundError(f"no model at {p}")
        if backbone_config is None:
            raise ValueError(f"{p} is a reference checkpoint: give its backbone config (--backbone-config)")
        return cls.from_reference_checkpoint(p, backbone_config, **rmt_kwargs)

    def save_pretrained(self, directory) -> None:
        """``model.safetensors`` + ``config.json`` in ``directory``."""
        checkpoints.save_pretrained(self, directory)

    def save_reference_checkpoint(self, path) -> None:
        """``model_best.pth`` in the reference implementation's format."""
        checkpoints.save_reference_checkpoint(self, path)
