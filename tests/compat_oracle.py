"""The reference's ``RMTEncoderForSequenceClassification.forward``, written out independently for the tests.

Shares no code with rmt_fast: the segmentation is ``oracle.segments_of`` (Python lists), the batch
walks the steps as the reference does (documents padded with empty segments at the front, steps with
no document skipped), and every loss is the Hugging Face backbone's own (``labels=`` passed to it), so
its ``problem_type`` rule is Hugging Face's code, not ours. Autograd flows through, as in the reference.
"""
import torch

from oracle import segments_of


def reference_forward(backbone, input_ids, labels=None, *, vocab_size, num_mem_tokens, input_size, cls_id,
                      sep_id, pad_id, alignment="right", max_n_segments=None, sum_loss=False,
                      last_segment_only=False, output_hidden_states=False, output_attentions=False):
    """A dict of the reference's outputs: logits, loss, loss_i, hidden_states_i, attentions_i."""
    M, T = num_mem_tokens, input_size
    S = T - M - 3
    per_doc = [segments_of(row.tolist(), S, max_n_segments, alignment, {cls_id, sep_id, pad_id})
               for row in input_ids]
    n = max(len(s) for s in per_doc)
    padded = [[None] * (n - len(s)) + s for s in per_doc]
    word = backbone.get_input_embeddings()
    mem_ids = list(range(vocab_size, vocab_size + M))
    memory = word(torch.tensor(mem_ids)).repeat(len(per_doc), 1, 1)          # [B, M, H]
    outs = []
    for k in range(n):
        present = [b for b in range(len(padded)) if padded[b][k] is not None]
        if not present:
            continue
        rows = [[cls_id] + mem_ids + [sep_id] + padded[b][k] + [sep_id] for b in present]
        ids = torch.tensor([r + [pad_id] * (T - len(r)) for r in rows])
        embeds = word(ids).clone()
        embeds[:, 1:M + 1] = memory[present]
        kw = {} if labels is None else {"labels": labels[present]}
        out = backbone(inputs_embeds=embeds, attention_mask=(ids != pad_id).long(), output_hidden_states=True,
                       output_attentions=output_attentions, **kw)
        memory = memory.clone()
        memory[present] = out.hidden_states[-1][:, 1:M + 1]
        outs = (outs + [out])[-1:] if last_segment_only else outs + [out]
    result = {"logits": outs[-1].logits}
    for i, out in enumerate(outs):
        if labels is not None:
            result[f"loss_{i}"] = out.loss
        if output_hidden_states:
            result[f"hidden_states_{i}"] = out.hidden_states
        if output_attentions:
            result[f"attentions_{i}"] = out.attentions
    if labels is not None:
        result["loss"] = torch.stack([o.loss for o in outs]).mean() if sum_loss else outs[-1].loss
    return result


def reference_forward_of(model, input_ids, labels=None, backbone=None, **kw):
    """``reference_forward`` with the sizes and ids of an rmt_fast model (on ``backbone``, default its own)."""
    c = model.config
    return reference_forward(backbone if backbone is not None else model.model, input_ids, labels,
                             vocab_size=c.vocab_size, num_mem_tokens=c.num_mem_tokens, input_size=c.input_size,
                             cls_id=c.cls_token_id, sep_id=c.sep_token_id, pad_id=c.pad_token_id,
                             alignment=c.segment_alignment, max_n_segments=c.max_n_segments,
                             sum_loss=c.sum_loss, **kw)
