"""The reference implementation's way of running inference, as a timed baseline for ``rmt-fast bench``.

The reference batches documents as they come and pads the batch to its longest document with empty
segments: documents are right-aligned, a step runs the backbone on the documents that have a segment
there, and the batch holds its rows until the longest document ends. Every step is one Hugging Face
call with ``inputs_embeds`` and ``output_hidden_states=True``; the reference keeps every step's outputs
(``keep_outputs``), which is what makes its memory grow with length.

This is a baseline, not a test oracle: the answer tests check against is ``tests/oracle.py``, and
``tests/test_oracle.py`` checks that this loop gives the oracle's logits.
"""
from __future__ import annotations

import copy
from typing import Callable, List, Optional, Sequence

import torch


class BaselineStopped(Exception):
    """A baseline run given up after ``segments`` steps, for ``reason`` 'time' or 'memory'."""

    def __init__(self, segments: int, reason: str):
        super().__init__(f"stopped at {segments} segments ({reason})")
        self.segments, self.reason = segments, reason


def reference_segments(doc: torch.Tensor, cfg) -> List[torch.Tensor]:
    """The reference's ``pad_and_segment`` for one document: special ids dropped, head kept up to
    ``max_n_segments``, cut from the end (right) or the start (left). doc: [L] -> segments [<= S] each."""
    S = cfg.segment_size
    doc = torch.as_tensor(doc).flatten()
    doc = doc[~torch.isin(doc, torch.tensor(cfg.special_token_ids, dtype=doc.dtype))]
    if cfg.max_n_segments is not None:
        doc = doc[:S * cfg.max_n_segments]
    n = doc.numel()
    if cfg.segment_alignment == "right":
        cuts = list(range(n, 0, -S))[1:][::-1]
    elif cfg.segment_alignment == "left":
        cuts = list(range(S, n, S))
    else:
        raise ValueError(f"the reference baseline runs right- or left-aligned segments, "
                         f"not {cfg.segment_alignment!r}")
    return [s for s in torch.tensor_split(doc, cuts) if s.numel()]


class ReferenceBaseline:
    """The reference's inference on a copy of ``model``'s backbone in ``dtype`` with ``attn`` attention
    ('eager' as the reference, 'sdpa' for the tuned baseline), keeping every step's outputs when
    ``keep_outputs`` (as the reference does). The copy is made once; ``run`` classifies one batch."""

    def __init__(self, model, dtype: torch.dtype, keep_outputs: bool, attn: str, device="cpu"):
        self.cfg, self.device, self.keep_outputs = model.config, torch.device(device), keep_outputs
        self.backbone = copy.deepcopy(model.model).to(device=device, dtype=dtype)
        self.backbone.set_attn_implementation(attn)
        self.mem_ids = torch.arange(self.cfg.vocab_size, self.cfg.vocab_size + self.cfg.num_mem_tokens,
                                    device=device)

    def _layout(self, rows: List[torch.Tensor]) -> torch.Tensor:                # -> [n, T]
        cfg, M = self.cfg, self.cfg.num_mem_tokens
        ids = torch.full((len(rows), cfg.input_size), cfg.pad_token_id, dtype=torch.long)
        ids[:, 0], ids[:, 1:M + 1], ids[:, M + 1] = cfg.cls_token_id, self.mem_ids.cpu(), cfg.sep_token_id
        for i, r in enumerate(rows):
            ids[i, M + 2:M + 2 + r.numel()] = r
            ids[i, M + 2 + r.numel()] = cfg.sep_token_id
        return ids.to(self.device)

    def run(self, docs: Sequence[torch.Tensor], stop: Optional[Callable[[int], Optional[str]]] = None,
            on_step: Optional[Callable[[int], None]] = None) -> torch.Tensor:
        """Logits [len(docs), num_labels] (in the baseline's dtype) of ``docs`` run as one padded batch.

        stop(segments_done) -> None or a reason ('time'/'memory'), asked before every step but the first:
        a reason ends the run with ``BaselineStopped``, and so does running out of CUDA memory.
        on_step(segments_done): called after every step (the memory timeline).
        """
        cfg, M = self.cfg, self.cfg.num_mem_tokens
        segments = [reference_segments(d, cfg) for d in docs]
        if any(not s for s in segments):
            raise ValueError("the reference gives an empty document no segment and no logits")
        n_steps = max(len(s) for s in segments)
        # Right-aligned: a document of k segments is an empty segment (None) for the first n_steps - k steps.
        padded = [[None] * (n_steps - len(s)) + s for s in segments]
        word = self.backbone.get_input_embeddings()
        memory = word(self.mem_ids).unsqueeze(0).repeat(len(docs), 1, 1)     # [B, M, H]
        kept, step = [], 0
        try:
            for step in range(n_steps):
                reason = stop(step) if stop is not None and step > 0 else None
                if reason is not None:                  # asked before a step: a finished run is kept
                    raise BaselineStopped(step, reason)
                present = [i for i, p in enumerate(padded) if p[step] is not None]
                ids = self._layout([padded[i][step] for i in present])          # [n, T]
                emb = word(ids)
                emb[:, 1:M + 1] = memory[present]
                out = self.backbone(inputs_embeds=emb, attention_mask=(ids != cfg.pad_token_id).long(),
                                    output_hidden_states=True)
                memory[present] = out.hidden_states[-1][:, 1:M + 1]
                if self.keep_outputs:
                    kept.append(out)
                if on_step is not None:
                    on_step(step + 1)
        except torch.cuda.OutOfMemoryError:
            kept.clear()
            raise BaselineStopped(step, "memory") from None
        return out.logits                                      # [B, num_labels]: every document ends here


def reference_loop(model, docs: Sequence[torch.Tensor], dtype: torch.dtype, keep_outputs: bool, attn: str,
                   device="cpu") -> Callable[..., torch.Tensor]:
    """``run(stop=None, on_step=None)``: ``ReferenceBaseline.run`` of ``docs``, the backbone copied now."""
    baseline = ReferenceBaseline(model, dtype, keep_outputs, attn, device)
    return lambda stop=None, on_step=None: baseline.run(docs, stop, on_step)
