"""Read once, ask many: the Engine's ``read``, ``read_many`` and ``ask`` on ``MemoryState``s.

Reading consumes left-aligned full segments only (S text ids each) and keeps the rest as the tail,
so reading A then B equals reading A+B. Asking runs, per question, the tail followed by the question
as one document that starts from the stored memory, cut by the model's own alignment: with left
alignment that is exactly ``classify([doc + question])``; with right or center alignment (whose cuts
depend on a total length a reader does not know) the document part is read in full left-aligned
segments and only the tail + question is placed right- or center-aligned (docs/ARCHITECTURE.md).
``max_n_segments`` does not apply: reading past it is the point of a state.

Every run goes through the Engine's slot loop (``Engine._run``) with a per-document start memory and
the per-document final memory written out.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .. import segmentation
from ..inputs import InvalidDocumentsError, as_documents
from ..memory_state import MemoryState, MemoryStateError, model_fingerprint
from ..tokenize import tokenize_long
from .sources import IdsSource


def fingerprint(engine) -> str:
    """The model's fingerprint, computed once per plan (the plan is rebuilt when the model changes)."""
    plan = engine.plan
    cached = getattr(engine, "_fingerprint_of", None)
    if cached is None or cached[0] is not plan:
        cached = engine._fingerprint_of = (plan, model_fingerprint(engine._model))
    return cached[1]


def _dtype_name(engine) -> str:
    """The compute dtype, e.g. 'bfloat16', with '+int8' where the plan quantizes its GEMMs (another answer)."""
    name = str(engine.dtype).replace("torch.", "")
    quantize = getattr(engine.plan, "quantize", None)
    return f"{name}+{quantize}" if quantize else name


def _ids(engine, docs: Sequence, tokenizer, what: str) -> List[torch.Tensor]:
    """Cleaned ids (special ids removed, no truncation) [n] int64 of each document (ids, or str with a tokenizer)."""
    cfg = engine.config
    raw = []
    for i, d in enumerate(docs):
        if isinstance(d, str):
            if tokenizer is None:
                raise InvalidDocumentsError({i: f"{what} {i} is text: pass tokenizer=... to read text"})
            d = tokenize_long(d, tokenizer)
        raw.append(d)
    specials = torch.tensor(cfg.special_token_ids, dtype=torch.int64)
    return [d[~torch.isin(d, specials)] for d in as_documents(raw, cfg)]


def _run_from(engine, docs: List[torch.Tensor], start: Optional[torch.Tensor], batch_size: int,
              progress: bool = False):
    """Run whole documents (ids [n_d], none empty) through the slots.

    start: [D, M, H] float32 start memories, or None for the initial memory.
    Returns (logits [D, num_labels], final memory [D, M, H] float32), both on the CPU.
    """
    cfg, dev = engine.config, engine.device
    D = len(docs)
    lengths = torch.tensor([d.numel() for d in docs], dtype=torch.int64)
    documents = segmentation.Documents(torch.cat(docs), torch.cumsum(lengths, 0) - lengths, lengths)
    segs = segmentation.cut(documents, cfg)
    M, H = cfg.num_mem_tokens, engine.plan.hidden
    final = torch.zeros(D + 1, M, H, device=dev)                                # the last row: a sink
    start = None if start is None else start.to(device=dev, dtype=torch.float32).contiguous()
    got = engine._run(IdsSource(documents, segs), min(batch_size, D), "error", "raise", progress,
                      total=len(segs), start_memory=start, final_memory=final)
    return torch.stack([got[d] for d in range(D)]), final[:D].cpu()


def _check_batch(batch_size) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _check_state(engine, state, where: str) -> None:
    if not isinstance(state, MemoryState):
        raise TypeError(f"{where} must be a MemoryState (from Engine.read or MemoryState.load), "
                        f"got {type(state).__name__}")
    cfg = engine.config
    state.check_usable(fingerprint(engine), cfg.to_dict(), _dtype_name(engine), where)
    if tuple(state.memory.shape) != (cfg.num_mem_tokens, engine.plan.hidden) or state.tail.numel() >= cfg.segment_size:
        raise MemoryStateError(f"{where}: memory {tuple(state.memory.shape)} / tail {state.tail.numel()} ids do not "
                               f"fit this model ([{cfg.num_mem_tokens}, {engine.plan.hidden}], "
                               f"under {cfg.segment_size})")


def read_many(engine, docs: Sequence, tokenizer=None, batch_size: int = 8,
              states: Optional[Sequence[Optional[MemoryState]]] = None, progress: bool = False) -> List[MemoryState]:
    """One MemoryState per document: its full left-aligned segments read, the rest kept as the tail.
    states: per document a state to go on from (None: start from the initial memory)."""
    _check_batch(batch_size)
    if isinstance(docs, (str, bytes)):
        raise TypeError("docs must be a list of documents, not one str: read_many([text], tokenizer=...)")
    cfg, S = engine.config, engine.config.segment_size
    ids = _ids(engine, docs, tokenizer, "document")
    states = list(states) if states is not None else [None] * len(ids)
    for i, st in enumerate(states):
        if st is not None:
            _check_state(engine, st, f"the state of document {i}" if len(ids) > 1 else "state")
    fp, config, dtype = fingerprint(engine), cfg.to_dict(), _dtype_name(engine)
    tokens = [ids[i] if st is None else torch.cat([st.tail, ids[i]]) for i, st in enumerate(states)]
    full = [len(t) // S * S for t in tokens]
    todo = [i for i in range(len(tokens)) if full[i]]
    memories = {i: (engine.plan.initial_memory.cpu() if st is None else st.memory) for i, st in enumerate(states)}
    if todo:
        start = torch.stack([memories[i] for i in todo])                         # [D, M, H]
        _, final = _run_from(engine, [tokens[i][:full[i]] for i in todo], start, batch_size, progress)
        memories.update(zip(todo, final))
    out = []
    for i, st in enumerate(states):
        out.append(MemoryState(memory=memories[i].clone(), tail=tokens[i][full[i]:].clone(),
                               n_tokens=(0 if st is None else st.n_tokens) + len(ids[i]),
                               n_segments=(0 if st is None else st.n_segments) + full[i] // S,
                               fingerprint=fp, config=config, dtype=dtype))
    return out


def ask(engine, state: MemoryState, questions: Sequence, tokenizer=None, batch_size: int = 8,
        progress: bool = False) -> torch.Tensor:
    """Logits [len(questions), num_labels] float32: per question, the document read into ``state``
    followed by that question. The questions run side by side, each slot starting from the state's memory."""
    _check_batch(batch_size)
    if isinstance(questions, (str, bytes)):
        raise TypeError("questions must be a list, not one str: ask(state, [question], tokenizer=...)")
    _check_state(engine, state, "state")
    ids = _ids(engine, questions, tokenizer, "question")
    tokens = [torch.cat([state.tail, q]) for q in ids]
    empty = {i: "no tokens in the document's tail nor in the question (empty)" for i, t in enumerate(tokens)
             if t.numel() == 0}
    if empty:
        raise InvalidDocumentsError(empty)
    if not tokens:
        return torch.zeros(0, engine.config.num_labels)
    start = state.memory.expand(len(tokens), -1, -1)                             # [n, M, H]
    logits, _ = _run_from(engine, tokens, start, batch_size, progress)
    return logits
