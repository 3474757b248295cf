"""torch.ops.rmt_fast.memory_write, by its compiled kernel and its pure-torch twin, against a float64 loop:
slot patterns, dtypes, strided hidden states and refusals (nothing written)."""
import pytest
import torch

from extension_cases import DEVICES, FNS, IMPLS, device_or_skip


# --- memory_write ---------------------------------------------------------------------------------

def memory_write_reference(state, hidden, row_offset, slots):
    expected = state.clone()
    M = state.shape[1]
    for b, s in enumerate(slots.tolist()):
        if s >= 0:
            expected[s] = hidden[b, row_offset:row_offset + M].double().float()
    return expected


def make_slots(S, B, pattern, device):
    slots = torch.randperm(max(S, B), device=device)[:B]
    slots[slots >= S] = -1
    if pattern == "some -1":
        slots[::2] = -1
    elif pattern == "all -1":
        slots[:] = -1
    return slots


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=str)
@pytest.mark.parametrize("pattern", ["all write", "some -1", "all -1"])
@pytest.mark.parametrize("H", [1, 31, 384])
@pytest.mark.parametrize("S,B,M", [(1, 1, 3), (4, 3, 10), (5, 1, 7), (3, 3, 4)])
@pytest.mark.parametrize("device", DEVICES)
def test_memory_write(device, S, B, M, H, pattern, hidden_dtype, impl):
    device_or_skip(device)
    row_offset, R = 1, M + 3
    state = torch.randn(S, M, H, device=device)
    hidden = torch.randn(B, R, H, device=device).to(hidden_dtype)
    slots = make_slots(S, B, pattern, device)
    state[slots[slots >= 0]] = float("nan")  # poison what is about to be written
    expected = memory_write_reference(state, hidden, row_offset, slots)
    assert FNS[impl][1](state, hidden, row_offset, slots) is None
    torch.testing.assert_close(state, expected, atol=0, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_memory_write_strided_hidden(impl):
    S, B, M, H, R = 4, 3, 10, 31, 16
    state = torch.randn(S, M, H)
    hidden = torch.randn(B, H, R).transpose(1, 2)  # [B, R, H], strides (H*R, 1, R)
    slots = torch.tensor([3, -1, 0])
    expected = memory_write_reference(state, hidden, R - M, slots)
    FNS[impl][1](state, hidden, R - M, slots)
    torch.testing.assert_close(state, expected, atol=0, rtol=0)


def _write_args(**over):
    S, B, M, H = 4, 3, 10, 31
    args = dict(state=torch.randn(S, M, H), hidden=torch.randn(B, M + 1, H), row_offset=1,
                slots=torch.tensor([2, -1, 0]))
    args.update({k: v(args[k]) for k, v in over.items()})
    return args


BAD_WRITE = {
    "state float64": (dict(state=lambda x: x.double()), r"state must be .*"),
    "state strided": (dict(state=lambda x: x.transpose(0, 1).contiguous().transpose(0, 1)),
                      r"state must be contiguous"),
    "state 2-D": (dict(state=lambda x: x[0]), r"state must be 3-D"),
    "hidden H": (dict(hidden=lambda x: x[..., :30]),
                 r"hidden must have shape \(B, R, H\).*got \[3, 11, 30\]"),
    "hidden B": (dict(hidden=lambda x: x[:2]), r"hidden must have shape \(B, R, H\)"),
    "hidden int": (dict(hidden=lambda x: x.int()), r"hidden must be float32, bfloat16, float16"),
    "row_offset past the end": (dict(row_offset=lambda x: 2),
                                r"rows row_offset \.\. row_offset \+ M - 1 = 2 \.\. 11 must lie "
                                r"within hidden's R = 11 rows"),
    "row_offset negative": (dict(row_offset=lambda x: -1),
                            r"rows row_offset .* = -1 \.\. 8 must lie within hidden's R = 11 rows"),
    "slots int32": (dict(slots=lambda x: x.int()), r"slots must be .*"),
    "slots 2-D": (dict(slots=lambda x: x[None]), r"slots must be 1-D"),
    "slot too large": (dict(slots=lambda x: torch.tensor([2, 4, 0])),
                       r"slots\[1\] = 4 is out of range for state with S = 4 slots"),
    "slot written twice": (dict(slots=lambda x: torch.tensor([2, -1, 2])),
                           r"slots\[0\] and slots\[2\] both write slot 2"),
    "slots on meta": (dict(slots=lambda x: x.to("meta")),
                      r"slots is on meta but state is on cpu; all tensors must be on one device"),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(BAD_WRITE))
def test_memory_write_rejects_bad_inputs(case, impl):
    over, pattern = BAD_WRITE[case]
    args = _write_args(**over)
    before = args["state"].clone()
    with pytest.raises(RuntimeError, match=r"rmt_fast::memory_write: " + pattern):
        FNS[impl][1](**args)
    if args["state"].shape == before.shape:
        torch.testing.assert_close(args["state"], before, atol=0, rtol=0)  # nothing written
