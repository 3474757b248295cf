"""An independent, deliberately slow implementation of docs/REFERENCE.md: the test oracle.

It shares no code with rmt_fast: plain Python lists for segmentation, the Hugging Face backbone
called once per segment per document (batch 1), the obvious way. Run it in float32 or float64.
Every test and benchmark that needs "the answer" takes it from here: this is the one slow segment loop.
"""
import math

import torch


def segments_of(ids, S, max_n_segments, alignment, specials):
    """The reference's pad_and_segment for one sequence, as Python lists."""
    seq = [int(t) for t in ids if int(t) not in specials]
    if max_n_segments is not None:
        seq = seq[:S * max_n_segments]
    L = len(seq)
    if alignment == "right":
        split = (list(range(L, 0, -S)) + [0])[::-1]
    elif alignment == "left":
        split = list(range(0, L, S)) + [L]
    else:
        n_seg = math.ceil(L / S)
        split = list(range(0, L, math.ceil(L / n_seg))) + [L] if L else [0]
    return [seq[a:b] for a, b in zip(split, split[1:])]


def oracle_logits(backbone, ids, *, vocab_size, num_mem_tokens, input_size, cls_id, sep_id, pad_id,
                  alignment="right", max_n_segments=None, empty_as_special=False, bptt_depth=-1,
                  return_memory=False, start_memory=None):
    """Logits [num_labels] of one document. backbone: a HF *ForSequenceClassification (vocab V+M).

    Differentiable when called with grad enabled. bptt_depth (the official RMT flag, "max number of
    previous segments in gradient computation"): the gradient of the last segment's output reaches
    the last segment and the ``bptt_depth`` segments before it; -1 reaches every segment and the
    initial memory. return_memory: also return the memory [M, H] after the last segment.
    start_memory: [M, H], the memory the first segment starts from instead of the initial memory
    (a document read on from a stored memory state).
    """
    M, T = num_mem_tokens, input_size
    S = T - M - 3
    segs = segments_of(ids, S, max_n_segments, alignment, {cls_id, sep_id, pad_id})
    if not segs:
        if not empty_as_special:
            raise ValueError("empty document")
        segs = [[]]
    word = backbone.get_input_embeddings()
    mem_ids = torch.tensor([vocab_size + i for i in range(M)])
    memory = word(mem_ids) if start_memory is None else start_memory        # [M, H]
    logits = None
    # Segments first_with_gradient.. get gradient; the initial memory counts as segment -1.
    first_with_gradient = -1 if bptt_depth == -1 else len(segs) - 1 - bptt_depth
    for i, seg in enumerate(segs):
        if i - 1 < first_with_gradient:   # the memory comes from outside the window
            memory = memory.detach()
        row = [cls_id] + mem_ids.tolist() + [sep_id] + seg + [sep_id]
        row = row + [pad_id] * (T - len(row))
        input_ids = torch.tensor([row])
        embeds = word(input_ids).clone()
        embeds[0, 1:M + 1] = memory
        mask = (input_ids != pad_id).long()
        out = backbone(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
        memory = out.hidden_states[-1][0, 1:M + 1]
        logits = out.logits[0]
    return (logits, memory) if return_memory else logits
