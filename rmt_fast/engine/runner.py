"""The Engine: the segment loop over slots, with the memory state kept on the device.

Per step, every busy slot runs one segment of its document through the plan; the new memory is
written back in place into one preallocated [slots, M, H] float32 state; a slot that starts a
document has its memory reset to the initial memory first; a document's logits are scattered into
the results on its last segment. Segment ids are laid out on the host a chunk of steps at a time and
copied to the device ahead of use. All control decisions come from the host-side schedule, so the
loop never reads anything back from the device.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from .. import segmentation
from ..inputs import InvalidDocumentsError, as_documents
from ..model import RMTForSequenceClassification
from .plan import InferencePlan
from .schedule import make_schedule

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
STEPS_PER_CHUNK = 64


def resolve_device(device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {str(device)!r} was requested but no CUDA GPU is available "
                               f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {str(device)!r} does not exist: {torch.cuda.device_count()} GPU(s) visible")
    elif dev.type != "cpu":
        raise RuntimeError(f"device {str(device)!r} is not supported; use 'cpu' or 'cuda[:N]'")
    return dev


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"dtype {dtype!r} is not supported; choose float32, bfloat16 or float16")


class Engine:
    """Fast inference for an ``RMTForSequenceClassification``.

    attention: 'auto' (fastest backend that can run, see ``engine.backends``), 'sdpa', 'matmul' or 'triton'.
    """

    def __init__(self, model: RMTForSequenceClassification, device="cpu", dtype=torch.float32,
                 attention: str = "auto"):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.config = model.config
        self.plan = InferencePlan(model.eval(), self.device, self.dtype, attention)

    # -- public --------------------------------------------------------------------------------
    @torch.inference_mode()
    def classify(self, docs: Sequence, batch_size: int = 8, empty: str = "error",
                 progress: bool = False) -> torch.Tensor:
        """Logits [len(docs), num_labels] float32 (on the CPU), in input order.

        docs: 1-D integer id sequences of any lengths (tensors, numpy arrays or lists); special ids
        are removed and documents longer than ``max_n_segments`` segments keep their head, as in the
        reference. batch_size: how many documents run side by side (slots).
        empty: what a document with no tokens left gets: 'error' (default; nothing is computed and
        InvalidDocumentsError names every such document) or 'special' (one segment holding only
        [CLS], memory and two [SEP], i.e. the model's answer to an empty text).
        """
        if empty not in ("error", "special"):
            raise ValueError(f"empty must be 'error' or 'special', got {empty!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        cfg = self.config
        raw = as_documents(docs, cfg)
        documents = segmentation.clean_and_truncate(raw, cfg)
        if empty == "error":
            empties = (documents.lengths == 0).nonzero().flatten().tolist()
            if empties:
                raise InvalidDocumentsError({i: "no tokens left after removing special ids (empty document); "
                                                "pass empty='special' to classify it as an empty text"
                                             for i in empties})
        self._warn_truncated(raw, documents)
        segs = segmentation.cut(documents, cfg, empty_as_one_segment=True)
        return self._run(documents, segs, batch_size, progress)

    def classify_texts(self, texts: Sequence[str], tokenizer, batch_size: int = 8, empty: str = "error",
                       progress: bool = False, chunk_chars: int = 1 << 16) -> torch.Tensor:
        """Tokenize each text in chunks (the same ids as tokenizing it whole) and classify."""
        from ..tokenize import tokenize_long
        docs = [tokenize_long(t, tokenizer, chunk_chars=chunk_chars) for t in texts]
        return self.classify(docs, batch_size=batch_size, empty=empty, progress=progress)

    # -- the loop ---------------------------------------------------------------------------------
    def _warn_truncated(self, raw, documents) -> None:
        cfg = self.config
        if cfg.max_n_segments is None:
            return
        limit = cfg.segment_size * cfg.max_n_segments
        cut = [i for i, d in enumerate(raw) if d.numel() > limit
               and int(documents.lengths[i]) == limit and d.numel() - int(documents.lengths[i]) > 0]
        if cut:
            warnings.warn(f"documents {cut[:10]}{'...' if len(cut) > 10 else ''} exceed max_n_segments="
                          f"{cfg.max_n_segments} ({limit} tokens) and keep only their head, as the reference does",
                          stacklevel=3)

    def _run(self, documents, segs, batch_size: int, progress: bool) -> torch.Tensor:
        cfg, plan, dev = self.config, self.plan, self.device
        D, M, H = len(documents), cfg.num_mem_tokens, plan.hidden
        if D == 0:
            return torch.zeros(0, cfg.num_labels)
        sched = make_schedule(segs, batch_size)
        B = sched.slots
        state = plan.initial_memory.expand(B, M, H).clone()                  # [B, M, H] float32
        results = torch.zeros(D + 1, cfg.num_labels, device=dev)             # row D: sink for unfinished slots
        pin = dev.type == "cuda"
        bar = tqdm(total=len(segs), unit="seg", disable=not progress, desc="segments")
        try:
            for s0 in range(0, sched.n_steps, STEPS_PER_CHUNK):
                chunk = _HostChunk(documents, segs, sched.table[s0:s0 + STEPS_PER_CHUNK], cfg, D)
                ids, key_len, dest = chunk.to(dev, pin)
                for c in range(chunk.steps):
                    self._step(state, results, ids[c], key_len[c], dest[c], chunk, c)
                bar.update(chunk.n_segments)
        finally:
            bar.close()
        return results[:D].cpu()

    def _step(self, state, results, ids, key_len, dest, chunk: "_HostChunk", c: int) -> None:
        plan = self.plan
        reset = chunk.reset_slots[c]
        if reset is not None:
            state.index_copy_(0, reset.to(state.device, non_blocking=True),
                              plan.initial_memory.expand(reset.numel(), -1, -1))
        kl = key_len if chunk.needs_mask[c] else None
        active = chunk.active_slots[c]
        if active is None:                                                    # every slot busy
            logits, new_mem = plan.step(ids, state, kl)
            state.copy_(new_mem)
            results.index_copy_(0, dest, logits)
        else:
            idx = active.to(state.device, non_blocking=True)
            logits, new_mem = plan.step(ids[idx], state[idx], None if kl is None else kl[idx])
            state.index_copy_(0, idx, new_mem.float())
            results.index_copy_(0, dest[idx], logits)


class _HostChunk:
    """The host-side inputs of a run of steps: laid-out ids and every per-step decision."""

    def __init__(self, documents, segs, table: torch.Tensor, cfg, D: int):
        self.steps, B = table.shape
        busy = table >= 0                                                    # [C, B]
        g = table.clamp(min=0)
        length = torch.where(busy, segs.length[g], 0)
        self.n_segments = int(busy.sum())
        self.ids = segmentation.layout(documents.tokens, segs.start[g].flatten(), length.flatten(),
                                       cfg).view(self.steps, B, cfg.input_size)
        self.key_len = segmentation.key_lengths(length, cfg)
        last = segs.index[g] == segs.count[segs.doc[g]] - 1
        self.dest = torch.where(busy & last, segs.doc[g], D)
        starts = busy & (segs.index[g] == 0)
        full_step = busy.all(dim=1).tolist()
        self.active_slots = [None if full_step[c] else busy[c].nonzero().flatten() for c in range(self.steps)]
        self.needs_mask = ((length < cfg.segment_size) & busy).any(dim=1).tolist()
        self.reset_slots = [starts[c].nonzero().flatten() if starts[c].any() else None for c in range(self.steps)]

    def to(self, device, pin: bool):
        def move(t):
            return t.pin_memory().to(device, non_blocking=True) if pin else t.to(device)
        return move(self.ids), move(self.key_len), move(self.dest)
