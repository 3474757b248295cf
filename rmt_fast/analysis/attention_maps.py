"""Attention maps of memory operations, the report's section 5 and Figure 6.

The document runs segment by segment through the plain-PyTorch model (``segment_step`` with
``output_attentions=True``, eager attention: the fast engine never materialises probabilities).
Attention is requested only on the chosen segments and reduced at once to the chosen layers and heads
(or their mean), cropped to the non-PAD positions, so memory stays bounded on long documents: the
other segments only carry the memory forward.

Every position of a segment gets a mark: [CLS], memory, [SEP], fact, question, background text (or
PAD, which is cropped away). The document is given as ids or text (the command line,
``attention_maps_cli``, also reads files and generated task samples). Fact and question spans are
half-open token-index ranges ``[start, end)`` into the document as given, before special ids are removed; they follow their tokens through the
cleaning, truncation and segmentation of ``rmt_fast.segmentation``.

The summary of a segment reads the memory rows (memory tokens as queries): the share of their
attention that goes to fact tokens, to the incoming memory, to [CLS]/[SEP], to question tokens and to
background text (the shares add up to one), beside the share each group would get from uniform
attention; and, where the segment holds the question, the share the question rows give the memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .. import segmentation
from ..config import RMTConfig
from ..inputs import as_documents

LABELS = ("pad", "cls", "memory", "sep", "background", "fact", "question")
PAD, CLS, MEMORY, SEP, BACKGROUND, FACT, QUESTION = range(len(LABELS))
# The groups of keys a memory row's attention is split into; they cover every non-PAD position.
GROUPS = {"fact": (FACT,), "memory": (MEMORY,), "cls_sep": (CLS, SEP), "question": (QUESTION,),
          "background": (BACKGROUND,)}

Span = Tuple[int, int]


@dataclass
class SegmentMap:
    segment: int                 # index of the segment in the document, 0 = first
    ids: torch.Tensor            # [T] layout ids of the non-PAD positions
    labels: torch.Tensor         # [T] int8, codes into LABELS
    doc_positions: torch.Tensor  # [T] int64, document index of each text token, -1 elsewhere
    attention: torch.Tensor      # [nL, nH, T, T] float32 probabilities; nL = nH = 1 when averaged
    summary: dict

    def positions(self, label: int) -> List[int]:
        return (self.labels == label).nonzero().flatten().tolist()


@dataclass
class AttentionMaps:
    layers: List[int]
    heads: List[int]
    mean: bool
    num_mem_tokens: int
    n_segments: int              # segments in the document
    doc_length: int              # tokens in the document as given
    segments: List[SegmentMap] = field(default_factory=list)
    # [num_labels]: the model's logits after the last segment run; the prediction when that is the
    # document's last segment (the run stops after the last requested segment).
    logits: Optional[torch.Tensor] = None
    last_segment_run: int = -1

    def selection_names(self) -> List[str]:
        if self.mean:
            def part(word, xs):
                return f"{word} {xs[0]}" if len(xs) == 1 else f"{word}s {_ranges(xs)}"
            return [f"mean of {part('layer', self.layers)}, {part('head', self.heads)}"]
        return [f"layer {l}, head {h}" for l in self.layers for h in self.heads]

    def to_dict(self) -> dict:
        segs = []
        for s in self.segments:
            marks = {LABELS[c]: _spans(s.labels == c) for c in (CLS, MEMORY, SEP, FACT, QUESTION)}
            segs.append({"segment": s.segment, "positions": int(s.ids.numel()),
                         "marks": marks, "summary": s.summary})
        return {"layers": self.layers, "heads": self.heads, "mean": self.mean,
                "num_mem_tokens": self.num_mem_tokens, "n_segments": self.n_segments,
                "doc_length": self.doc_length, "kept_segments": [s.segment for s in self.segments],
                "last_segment_run": self.last_segment_run,
                "logits": None if self.logits is None else self.logits.tolist(), "segments": segs}


def _spans(mask: torch.Tensor) -> List[List[int]]:
    """Half-open [start, end) ranges of the True runs of a 1-D mask."""
    idx = mask.nonzero().flatten().tolist()
    out: List[List[int]] = []
    for i in idx:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def _ranges(xs: Sequence[int]) -> str:
    return ",".join(str(x) for x in xs) if len(xs) <= 4 else f"{xs[0]}..{xs[-1]}"


# -- marks --------------------------------------------------------------------------------------

def find_token_spans(doc_ids: Sequence[int], pattern: Sequence[int]) -> List[Span]:
    """Every [start, end) where ``pattern`` occurs as a contiguous run in ``doc_ids``."""
    doc, pat = torch.as_tensor(list(doc_ids)), torch.as_tensor(list(pattern))
    k = pat.numel()
    if k == 0 or k > doc.numel():
        return []
    hits = (doc.unfold(0, k, 1) == pat).all(1).nonzero().flatten().tolist()
    return [(i, i + k) for i in hits]


def _check_spans(spans: Sequence[Span], n: int, what: str) -> List[Span]:
    out = []
    for sp in spans:
        a, b = (int(x) for x in sp)
        if not 0 <= a < b <= n:
            raise ValueError(f"{what} span {sp} is not a non-empty range inside the document's {n} tokens")
        out.append((a, b))
    return out


def segment_labels(ids: torch.Tensor, doc_positions: torch.Tensor, config: RMTConfig,
                   fact_mask: torch.Tensor, question_mask: torch.Tensor) -> torch.Tensor:
    """Marks of one laid-out segment. ids, doc_positions: [T]; fact/question masks: [doc_length] bool."""
    M = config.num_mem_tokens
    labels = torch.full(ids.shape, BACKGROUND, dtype=torch.int8)
    labels[ids == config.pad_token_id] = PAD
    labels[ids == config.sep_token_id] = SEP
    labels[0] = CLS
    labels[1:M + 1] = MEMORY
    text = doc_positions >= 0
    pos = doc_positions.clamp(min=0)
    labels[text & question_mask[pos]] = QUESTION
    labels[text & fact_mask[pos]] = FACT
    return labels


# -- the summary --------------------------------------------------------------------------------

def memory_attention_summary(probs: torch.Tensor, labels: torch.Tensor) -> dict:
    """What the memory rows attend to. probs: [..., T, T] (rows are queries), labels: [T] codes.

    Leading dims (layers, heads) are averaged first. Returns, for the memory rows, the mean share of
    their attention on each group of keys (``memory_rows``: fact, memory, cls_sep, question,
    background; they add up to one up to PAD leakage), the share each group would get from uniform
    attention over the non-PAD keys (``uniform``), the token counts, and ``question_to_memory``: the
    mean share the question rows give the memory (None without question tokens).
    """
    p = probs.to(torch.float64)
    while p.dim() > 2:
        p = p.mean(0)
    labels = labels.to(torch.int64)
    if p.shape != (labels.numel(), labels.numel()):
        raise ValueError(f"probs {tuple(probs.shape)} do not match {labels.numel()} labels")
    mem_rows = labels == MEMORY
    if not bool(mem_rows.any()):
        raise ValueError("no memory positions among the labels")
    valid = labels != PAD
    out = {"memory_rows": {}, "uniform": {},
           "counts": {LABELS[c]: int((labels == c).sum()) for c in range(1, len(LABELS))}}
    rows = p[mem_rows]                                          # [M, T]
    for name, codes in GROUPS.items():
        cols = torch.isin(labels, torch.tensor(codes))
        out["memory_rows"][name] = float(rows[:, cols].sum(1).mean())
        out["uniform"][name] = float(cols.sum()) / float(valid.sum())
    q_rows = labels == QUESTION
    out["question_to_memory"] = float(p[q_rows][:, mem_rows].sum(1).mean()) if bool(q_rows.any()) else None
    return out


# -- running the model --------------------------------------------------------------------------

def _select(values: Optional[Sequence[int]], n: int, what: str) -> List[int]:
    if values is None:
        return list(range(n))
    out = []
    for v in values:
        i = int(v) + n if int(v) < 0 else int(v)
        if not 0 <= i < n:
            raise ValueError(f"{what} {v} is out of range: the model has {n}")
        if i not in out:
            out.append(i)
    if not out:
        raise ValueError(f"no {what} selected")
    return out


def _as_ids(document, tokenizer) -> torch.Tensor:
    if isinstance(document, str):
        if tokenizer is None:
            raise ValueError("a text document needs a tokenizer")
        return torch.tensor(tokenizer(document, add_special_tokens=False)["input_ids"], dtype=torch.int64)
    return document


def attention_maps(model, document, fact_spans: Sequence[Span] = (), question_spans: Sequence[Span] = (),
                   layers: Optional[Sequence[int]] = None, heads: Optional[Sequence[int]] = None,
                   segments: Union[str, Sequence[int], None] = "auto", mean: bool = True,
                   tokenizer=None, progress: bool = False) -> AttentionMaps:
    """Attention probabilities of one document, segment by segment, through ``model.segment_step``.

    model: an ``RMTForSequenceClassification``; it is switched to eager attention and eval mode for
    the run and put back afterwards. document: 1-D token ids (tensor or list), or text with
    ``tokenizer`` (tokenized without special tokens). fact_spans, question_spans: [start, end) token
    ranges into the document's ids. layers, heads: indices (negative from the end), None for all.
    segments: indices (negative from the end), "all"/None, or "auto" (the segments holding fact or
    question tokens, plus the first and the last). mean: average the chosen layers and heads into one
    map per segment; otherwise keep one per (layer, head).
    """
    cfg: RMTConfig = model.config
    M = cfg.num_mem_tokens
    raw = as_documents([_as_ids(document, tokenizer)], cfg)[0]          # [N] int64
    n = raw.numel()
    facts = _check_spans(fact_spans, n, "fact")
    questions = _check_spans(question_spans, n, "question")
    fact_mask, question_mask = torch.zeros(n + 1, dtype=torch.bool), torch.zeros(n + 1, dtype=torch.bool)
    for a, b in facts:
        fact_mask[a:b] = True
    for a, b in questions:
        question_mask[a:b] = True

    docs = segmentation.clean_and_truncate([raw], cfg, keep_positions=True)
    if docs.lengths[0] == 0:
        raise ValueError("the document has no tokens left after removing special ids")
    kept = docs.positions  # [K] document index of every token that survives cleaning and truncation
    segs = segmentation.cut(docs, cfg)
    G = len(segs)

    def doc_positions(g: int, T: int) -> torch.Tensor:
        pos = torch.full((T,), -1, dtype=torch.int64)
        k, start = int(segs.length[g]), int(segs.start[g] - docs.starts[0])
        pos[M + 2:M + 2 + k] = kept[start:start + k]
        return pos

    if segments is None or segments == "all":
        wanted = list(range(G))
    elif segments == "auto":
        marked = fact_mask[kept] | question_mask[kept]
        wanted = sorted({0, G - 1} | {g for g in range(G)
                                      if bool(marked[int(segs.start[g]):int(segs.start[g] + segs.length[g])].any())})
    else:
        wanted = sorted(set(_select(segments, G, "segment")))
    wanted_set = set(wanted)

    bconf = model.model.config
    layer_idx = _select(layers, bconf.num_hidden_layers, "layer")
    head_idx = _select(heads, bconf.num_attention_heads, "head")
    result = AttentionMaps(layers=layer_idx, heads=head_idx, mean=mean, num_mem_tokens=M, n_segments=G,
                           doc_length=n)

    previous_impl = getattr(bconf, "_attn_implementation", None)
    was_training = model.training
    if previous_impl != "eager":
        model.model.set_attn_implementation("eager")
    model.eval()
    device = model.mem_token_ids.device
    steps = range(max(wanted) + 1)  # nothing after the last requested segment is needed
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc="segments", unit="seg")
    try:
        with torch.no_grad():
            memory = model.initial_memory().unsqueeze(0)                  # [1, M, H]
            for g in steps:
                ids = segmentation.layout(docs.tokens, segs.start[g:g + 1], segs.length[g:g + 1], cfg)
                keep = g in wanted_set
                logits, memory, attn = model.segment_step(ids.to(device), memory, output_attentions=keep)
                result.logits, result.last_segment_run = logits[0].float().cpu(), g
                if not keep:
                    continue
                if not attn:
                    raise RuntimeError("the backbone returned no attentions; it needs eager attention")
                T = int(segmentation.key_lengths(segs.length[g:g + 1], cfg))
                # [nL, nH, T, T]: only the chosen layers and heads, cropped to non-PAD, copied off the big tensor
                maps = torch.stack([attn[l][0, head_idx, :T, :T] for l in layer_idx]).float().cpu()
                if mean:
                    maps = maps.mean((0, 1), keepdim=True)
                del attn
                ids1 = ids[0, :T].clone()
                pos = doc_positions(g, T)
                labels = segment_labels(ids1, pos, cfg, fact_mask, question_mask)
                result.segments.append(SegmentMap(segment=g, ids=ids1, labels=labels, doc_positions=pos,
                                                  attention=maps.clone(),
                                                  summary=memory_attention_summary(maps, labels)))
    finally:
        if previous_impl is not None and previous_impl != "eager":
            model.model.set_attn_implementation(previous_impl)
        model.train(was_training)
    return result
