"""rmt_fast.compat against the reference's forward (tests/compat_oracle.py), on random tiny BERTs.

Documents come as a tokenizer gives them ([CLS] ... [SEP] then padding), of mixed lengths, some past
max_n_segments (truncated), so steps hold different sets of documents.
"""
import copy
import inspect
import io
import pickle
from types import SimpleNamespace

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from compat_oracle import reference_forward_of
from rmt_fast.compat import RMTEncoderCPUOffload, RMTEncoderForSequenceClassification

V, M, T = 60, 3, 24          # tokenizer vocabulary, memory tokens, input_size: 18 text tokens per segment
TOKENIZER = SimpleNamespace(cls_token_id=1, sep_token_id=2, pad_token_id=0)
REFERENCE_PARAMETERS = ["input_ids", "attention_mask", "token_type_ids", "position_ids", "head_mask",
                        "inputs_embeds", "labels", "output_attentions", "output_hidden_states", "return_dict"]


def compat_model(cls=RMTEncoderForSequenceClassification, num_labels=4, max_n_segments=4, **kw):
    bc = BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    max_position_embeddings=64, initializer_range=0.2, num_labels=num_labels)
    backbone = BertForSequenceClassification(bc)
    backbone.config._attn_implementation = "eager"
    return cls(backbone, num_mem_tokens=M, tokenizer=TOKENIZER, input_size=T, max_n_segments=max_n_segments,
               **kw).eval()


def batch(lengths):
    """[B, L] ids as a tokenizer pads them: [CLS] text [SEP] [PAD]...; and the attention mask."""
    L = max(lengths) + 2
    ids = torch.zeros(len(lengths), L, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, :n + 2] = torch.cat([torch.tensor([1]), torch.randint(3, V, (n,)), torch.tensor([2])])
    return ids, (ids != 0).long()


LENGTHS = [7, 40, 18, 90]    # 1, 3, 1 and 5 segments (the last truncated to 4)


def close(a, b, tol=1e-5):
    return (a.double() - b.double()).abs().max().item() <= tol


def test_forward_declares_the_reference_parameters_in_order():
    params = list(inspect.signature(RMTEncoderForSequenceClassification.forward).parameters)
    assert params[1:] == REFERENCE_PARAMETERS
    assert list(inspect.signature(RMTEncoderCPUOffload.forward).parameters)[1:] == REFERENCE_PARAMETERS


def test_eval_fast_path_matches_reference_and_returns_ordinary_tensors():
    model = compat_model()
    ids, mask = batch(LENGTHS)
    with torch.no_grad():
        want = reference_forward_of(model, ids)["logits"]
        out = model(ids, mask)                        # positional mask, as scripts pass it
    assert model._engine is not None                  # the Engine answered
    assert close(out.logits, want)
    assert list(out.keys()) == ["logits", "hidden_states"] and out.hidden_states is None
    assert not out.logits.is_inference()
    out.logits[:, 0] = 0                              # an ordinary tensor takes in-place edits


@pytest.mark.parametrize("sum_loss", [False, True])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_loss_and_per_segment_losses(sum_loss, mode):
    model = compat_model(sum_loss=sum_loss)
    getattr(model, mode)()
    model.model.config.hidden_dropout_prob = 0.0
    for m in model.modules():                         # train mode without dropout: comparable numbers
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ids, _ = batch(LENGTHS)
    labels = torch.randint(0, 4, (len(LENGTHS),))
    with torch.no_grad():
        want = reference_forward_of(model, ids, labels)
        out = model(input_ids=ids, labels=labels)
    loss_keys = [k for k in out.keys() if "loss" in k]
    assert loss_keys == ["loss"] + [f"loss_{i}" for i in range(4)]
    for k in loss_keys:
        assert close(out[k], want[k]), k
    segment = torch.stack([out[f"loss_{i}"] for i in range(4)])
    assert close(out.loss, segment.mean() if sum_loss else segment[-1])
    assert close(out.logits, want["logits"])


@pytest.mark.parametrize("kind", ["regression", "single_label_classification", "multi_label_classification"])
@pytest.mark.parametrize("lengths", [[7, 12, 18], LENGTHS], ids=["one-segment", "several-segments"])
def test_problem_type_follows_hugging_face(kind, lengths):
    num_labels = 1 if kind == "regression" else 3
    model = compat_model(num_labels=num_labels)
    reference_backbone = copy.deepcopy(model.model)   # Hugging Face fixes problem_type on its first call
    B = len(lengths)
    labels = {"regression": torch.randn(B), "single_label_classification": torch.randint(0, 3, (B,)),
              "multi_label_classification": torch.randint(0, 2, (B, 3)).float()}[kind]
    ids, _ = batch(lengths)
    with torch.no_grad():
        out = model(ids, labels=labels)
        want = reference_forward_of(model, ids, labels, backbone=reference_backbone)
    assert model.model.config.problem_type == reference_backbone.config.problem_type == kind
    assert model._engine is not None                  # the Engine answered, per segment when several
    assert out.logits.shape == (B, num_labels)
    for k in ["loss"] + [k for k in want if k.startswith("loss_")]:
        assert close(out[k], want[k]), k


@pytest.mark.parametrize("objective", ["loss", "logit"])
def test_eval_mode_with_grad_enabled_backpropagates_like_the_reference(objective):
    """Eval mode, grad on: eval-mode fine-tuning (the loss) and saliency (a logit, no labels)."""
    model = compat_model()
    ids, _ = batch(LENGTHS)
    labels = torch.randint(0, 4, (len(LENGTHS),)) if objective == "loss" else None

    def scalar(out):
        return out["loss"] if objective == "loss" else out["logits"][:, 1].sum()

    scalar(model(ids, labels=labels)).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    scalar(reference_forward_of(model, ids, labels)).backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and "model.bert.embeddings.word_embeddings.weight" in got
    for n in want:
        assert close(got[n], want[n], 1e-5), n


def test_hidden_states_and_attentions_per_segment():
    model = compat_model()
    ids, _ = batch(LENGTHS)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, output_attentions=True)
        want = reference_forward_of(model, ids, output_hidden_states=True, output_attentions=True)
    present = [1, 2, 2, 4]                            # documents with a segment at each step
    for i, n_i in enumerate(present):
        hs, att = out[f"hidden_states_{i}"], out[f"attentions_{i}"]
        assert len(hs) == 3 and hs[0].shape == (n_i, T, 32) and len(att) == 2 and att[0].shape == (n_i, 4, T, T)
        assert all(close(a, b) for a, b in zip(hs, want[f"hidden_states_{i}"]))
        assert all(close(a, b) for a, b in zip(att, want[f"attentions_{i}"]))
    assert out.hidden_states is out["hidden_states_3"] and out.attentions is out["attentions_3"]
    assert "hidden_states_4" not in out


def test_float64_model_gives_float64_logits():
    model = compat_model().double()
    ids, _ = batch(LENGTHS)
    with torch.no_grad():
        out = model(ids)
        want = reference_forward_of(model, ids)["logits"]
    assert out.logits.dtype == torch.float64 and close(out.logits, want, 1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_give_logits_in_their_dtype(dtype):
    """bfloat16 weights run on the Engine in bfloat16; float16 on the CPU falls back to the plain path."""
    model = compat_model()
    ids, _ = batch(LENGTHS)
    with torch.no_grad():
        want = reference_forward_of(model, ids)["logits"]
        out = model.to(dtype)(ids)
    assert out.logits.dtype == dtype
    assert (model._engine is not None) == (dtype == torch.bfloat16)
    assert close(out.logits, want, 0.05 * want.abs().max().item() + 0.02)


def test_autocast_runs_the_fast_path_in_the_autocast_dtype():
    model = compat_model()
    ids, _ = batch(LENGTHS)
    with torch.no_grad():
        want = reference_forward_of(model, ids)["logits"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids)
    assert model._engine.dtype == torch.bfloat16
    assert out.logits.dtype == torch.bfloat16         # the reference's logits under autocast
    assert close(out.logits, want, 0.05 * want.abs().max().item() + 0.02)


def test_copies_and_pickles_after_an_eval_forward():
    model = compat_model()
    ids, _ = batch(LENGTHS)
    with torch.no_grad():
        before = model(ids).logits
    assert model._engine is not None
    twin = copy.deepcopy(model)
    pickled = pickle.loads(pickle.dumps(model))
    torch.save(model, io.BytesIO())
    assert not any("engine" in k for k in model.state_dict())
    with torch.no_grad():
        for other in (twin, pickled):
            assert other._engine is None
            assert torch.equal(other(ids).logits, before)


def test_state_dict_is_the_references_and_loads_strictly():
    model = compat_model()
    state = model.state_dict()
    backbone_keys = {f"model.{k}" for k in BertForSequenceClassification(model.model.config).state_dict()}
    assert set(state) == backbone_keys | {"model.embeddings.weight", "cls_token", "sep_token", "mem_token_ids"}
    assert torch.equal(state["model.embeddings.weight"], state["model.bert.embeddings.word_embeddings.weight"])
    other = compat_model()
    other.load_state_dict(state, strict=True)
    without_alias = {k: v for k, v in state.items() if k != "model.embeddings.weight"}
    other.load_state_dict(without_alias, strict=True)
    bad = dict(state, **{"model.embeddings.weight": state["model.embeddings.weight"] + 1})
    with pytest.raises(ValueError, match="alias"):
        other.load_state_dict(bad)


def test_run_script_arguments_off_are_silent_and_on_are_refused():
    off = dict(memory_forward_func=None, memory_layers=None, share_memory_layers=False, reconstruction_loss_coef=None)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat_model(**off)
    for name, on in [("memory_layers", "all"), ("share_memory_layers", True), ("reconstruction_loss_coef", 0.5),
                     ("memory_forward_func", print)]:
        with pytest.raises(ValueError, match=name):
            compat_model(**dict(off, **{name: on}))


def test_unsupported_arguments_are_refused():
    model = compat_model()
    ids, _ = batch([5])
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, position_ids=torch.arange(ids.shape[1])[None])
    with pytest.raises(ValueError, match="return_dict"):
        model(ids, return_dict=False)


@pytest.mark.parametrize("grad", [False, True])
def test_cpu_offload_keeps_only_the_last_segment(grad):
    model = compat_model(RMTEncoderCPUOffload, sum_loss=True)
    ids, _ = batch(LENGTHS)
    labels = torch.randint(0, 4, (len(LENGTHS),))
    with torch.set_grad_enabled(grad):
        out = model(ids, labels=labels)
        want = reference_forward_of(model, ids, labels, last_segment_only=True)
    assert [k for k in out.keys() if "loss" in k] == ["loss", "loss_0"]
    assert close(out.loss_0, want["loss_0"]) and close(out.loss, want["loss_0"])
    assert close(out.logits, want["logits"])
    assert (model._engine is not None) == (not grad)   # eval with labels: still the Engine


def test_cpu_offload_frees_each_segments_outputs():
    """With hidden states asked for (the plain path), no earlier segment's hidden states stay alive."""
    import weakref
    model = compat_model(RMTEncoderCPUOffload, max_n_segments=None)
    alive, step = [], model.segment_forward

    def tracking(*a, **kw):
        out = step(*a, **kw)
        alive.append(weakref.ref(out.hidden_states[0]))
        return out

    model.segment_forward = tracking
    ids, _ = batch([18 * 6])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    assert len(alive) == 6
    assert [r() is not None for r in alive] == [False] * 5 + [True]
    assert list(k for k in out.keys() if k.startswith("hidden_states_")) == ["hidden_states_0"]
