"""int8 inference (rmt_fast/engine/quant.py) against float64 oracles of the same quantization, and the
int8 Engine against float32 on long documents of the shipped model."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from helpers import bert_base_cased_config, make_model
from rmt_fast import Engine
from rmt_fast.engine import quant
from rmt_fast.engine.quant import Int8Linear, quantize_rows, quantize_weight

INT8_REASON = quant.int8_available(torch.device("cpu"))
requires_int8 = pytest.mark.skipif(INT8_REASON is not None, reason=f"no int8 GEMM: {INT8_REASON}")
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "rmt_fast" / "data" / "default_model"


def oracle_quantize(t: torch.Tensor):
    """Symmetric per-row quantization in float64: (q as float64 integers, scale [R, 1] float64).

    The scale is the float32 one (amax / 127 rounded to float32, as stored); q = round(t / scale).
    """
    t64 = t.double()
    scale = (t64.abs().amax(dim=1, keepdim=True) / 127).float().double()
    return torch.round(t64 / scale), scale


def near_tie(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Elements whose t / scale lies within float32 rounding of a .5 tie (either rounding is right)."""
    v = t.double() / scale
    return ((v - v.floor() - 0.5).abs() < 1e-5 * v.abs().clamp_min(1))


def rows_of_mixed_magnitude(R, K):
    """Rows whose magnitudes differ by up to 1e4: a per-tensor scale would flatten the small ones."""
    return torch.randn(R, K) * torch.logspace(-2, 2, R)[:, None]


@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (130, 769)])
def test_weight_quantization_is_per_output_channel(shape):
    w = rows_of_mixed_magnitude(*shape)
    q, scale = quantize_weight(w)
    want_q, want_scale = oracle_quantize(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (shape[0],)
    assert torch.equal(scale.double(), want_scale[:, 0])                      # exact, per channel
    ok = (q.double() == want_q) | near_tie(w, want_scale)
    assert ok.all()
    assert q.abs().max() <= 127 and (q.abs().amax(1) == 127).all()          # every channel uses its range


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 5), (9, 64), (513, 129)])
def test_activation_quantization_is_per_token(dtype, shape):
    x = rows_of_mixed_magnitude(*shape).to(dtype)
    x[0, :] = 0                                                                # an all-zero row: q = 0
    before = x.clone()
    q, scale = quantize_rows(x)
    assert torch.equal(x, before)                                              # input untouched
    want_q, want_scale = oracle_quantize(x)
    want_scale[0] = torch.finfo(torch.float32).tiny / 127
    assert q.dtype == torch.int8 and scale.shape == (shape[0], 1)
    assert torch.equal(scale.double()[1:], want_scale[1:])
    assert (q[0] == 0).all()
    ok = (q.double() == want_q) | near_tie(x, want_scale)
    assert ok[1:].all()


@requires_int8
@pytest.mark.parametrize("act", [None, "gelu", "relu"])
@pytest.mark.parametrize("lead", [(1,), (2, 7), (3, 65), (2, 300)])          # 600 rows: three row blocks
@pytest.mark.parametrize("K,N", [(1, 1), (33, 101), (768, 2 * 768 + 3)])
def test_int8_linear_against_float64_oracle_of_same_quantization(act, lead, K, N):
    x = torch.randn(*lead, K).to(torch.bfloat16) * 3
    w = torch.randn(N, K) / K ** 0.5 * torch.logspace(-1, 1, N)[:, None]       # channels of mixed size
    b = torch.randn(N)
    lin = Int8Linear(w, b, act, out_dtype=torch.bfloat16)
    y = lin(x)
    assert y.dtype == torch.bfloat16 and y.shape == (*lead, N)

    # Exact on integers: the int32 sums equal float64 sums of the same int8 values. The scales are the
    # oracle's (float64, per token and per output channel), not the layer's.
    x2 = x.reshape(-1, K)
    qx, _ = quantize_rows(x2)
    _, sx = oracle_quantize(x2)                                                 # [R, 1]
    _, sw = oracle_quantize(w)
    sw = sw[:, 0]                                                               # [N]
    acc = torch._int_mm(qx, lin.qweight_t)
    assert acc.dtype == torch.int32 and torch.equal(acc.double(), qx.double() @ lin.qweight_t.double())

    # The whole layer: float64 dequantization of the same integers, then the activation; the layer
    # rounds once to bfloat16 at the end (half an ulp, 2^-9 relative) after float32 arithmetic.
    want = acc.double() * sx.double() * sw.double() + b.double()
    want = (want if act is None else ACT2FN[act](want)).view(*lead, N)
    err = (y.double() - want).abs()
    assert (err <= 2 ** -8 * want.abs() + 1e-5 * (1 + want.abs().max())).all()

    # Against the unquantized product: within the dequantization error (half a step of each operand).
    exact = F.linear(x.double(), w.double(), b.double())
    exact = exact if act is None else ACT2FN[act](exact)
    xs, ws = x2.double().abs(), w.double().abs()
    bound = (0.5 * sw.double() * xs.sum(1, keepdim=True) + 0.5 * sx.double() * ws.sum(1)).view(*lead, N)
    assert ((y.double() - exact).abs() <= bound * 1.001 + 2 ** -8 * exact.abs() + 1e-5).all()


@requires_int8
def test_int8_linear_takes_strided_input_and_float32():
    x = torch.randn(4, 30, 48)
    w, b = torch.randn(20, 48), torch.randn(20)
    lin = Int8Linear(w, b, out_dtype=torch.float32)
    got = lin(x[:, :11])
    want = lin(x[:, :11].contiguous())
    assert got.dtype == torch.float32 and torch.equal(got, want)


@requires_int8
def test_int8_weights_are_a_quarter_of_float32():
    """GEMM weights at most 0.3x their float32 size (int8 + a float32 scale and bias per channel)."""
    N, K = 3 * 64, 64
    lin = Int8Linear(torch.randn(N, K), torch.randn(N), out_dtype=torch.bfloat16)
    assert lin.nbytes <= 0.3 * 4 * (N * K + N)


def small_model():
    return make_model(bert_base_cased_config(num_layers=3, hidden_size=64, num_attention_heads=4,
                                             intermediate_size=160), num_mem_tokens=4, input_size=40)


@requires_int8
def test_engine_int8_reports_which_gemms_are_int8():
    engine = Engine(small_model(), dtype="bfloat16", quantize="int8")
    plan = engine.plan
    assert plan.quantize == "int8" and plan.quantize_status.startswith(f"int8 ({quant.cpu_int8_isa()}")
    assert ("micro-kernel" if quant.vnni_problem() is None else "torch._int_mm") in plan.quantize_status
    # Every GEMM of layers 0-1; in the last layer only the key/value projection (every row); its
    # [CLS]/memory-row GEMMs stay in bfloat16 (docs/PERF.md: measured drift).
    want = [f"layer {i} {n}" for i in (0, 1) for n in ("qkv", "out", "ffn_in", "ffn_out")] + ["layer 2 kv"]
    assert plan.int8_gemms == want
    last = plan.layers[-1]
    assert all(not isinstance(getattr(last, n), Int8Linear) for n in ("q", "out", "ffn_in", "ffn_out"))
    assert Engine(small_model(), dtype="bfloat16").plan.int8_gemms == []


def test_engine_int8_where_impossible_is_an_error(monkeypatch):
    model = small_model()
    with pytest.raises(ValueError, match="quantize='int4' is not supported; choose None or 'int8'"):
        Engine(model, quantize="int4")
    with pytest.raises(ValueError, match=r"--quantize int8\) is not possible here: int8 runs on the CPU only \(device cuda"):
        quant.check_quantize("int8", torch.device("cuda"))
    monkeypatch.setattr(quant, "_int_mm_problem", lambda: "torch._int_mm failed on the CPU: no kernel")
    with pytest.raises(ValueError, match=r"int8 \(quantize='int8', --quantize int8\) is not possible here: torch._int_mm failed"):
        Engine(model, dtype="bfloat16", quantize="int8")


def test_engine_int8_without_vnni_says_so(monkeypatch):
    if INT8_REASON is not None:
        pytest.skip(INT8_REASON)
    monkeypatch.setattr(quant, "cpu_int8_isa", lambda: None)
    status = Engine(small_model(), dtype="bfloat16", quantize="int8").plan.quantize_status
    assert "no VNNI/AMX" in status


@pytest.fixture(scope="module")
def shipped():
    from rmt_fast.model import RMTForSequenceClassification
    from rmt_fast.tasks import TaskGenerator, load_tokenizer
    model = RMTForSequenceClassification.from_pretrained(str(DEFAULT_MODEL))
    gen = TaskGenerator("detect", load_tokenizer(str(DEFAULT_MODEL)), model.config, split="test", seed=77)
    return model, gen


@requires_int8
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_engine_int8_against_float32_on_long_documents(shipped, dtype):
    """Detect & Memorize documents of 300 segments (15,300 text tokens, 300 memory updates).

    Bounds from benchmarks/bench_int8.py drift (docs/PERF.md), with margin: with bf16 elsewhere the gap
    is that of the bf16 Engine (its logits are rounded to bf16: ulp 0.0625 at |logit| 8-16); int8 with
    float32 elsewhere (asymmetric activations there) measured max gaps of 0.008-0.013 on 100 documents
    of 16 to 4,096 segments.
    """
    model, gen = shipped
    ids, labels = gen.batch(300, range(12))
    ref = Engine(model).classify(ids, batch_size=12)
    got = Engine(model, dtype=dtype, quantize="int8").classify(ids, batch_size=12)
    assert torch.equal(got.argmax(1), ref.argmax(1))
    gap = (got - ref).abs().max().item()
    assert gap <= {"bfloat16": 0.08, "float32": 0.03}[dtype]
    if dtype == "float32":
        assert gap > 0                          # int8 did run: float32 elsewhere is otherwise exact


@requires_int8
def test_cli_quantize_flag(shipped, tmp_path, capsys, monkeypatch):
    """`--quantize int8` reaches the Engine from classify (its label is float32's), demo and bench."""
    import json

    from rmt_fast.cli import main
    calls = []
    int8_call = Int8Linear.__call__
    monkeypatch.setattr(Int8Linear, "__call__", lambda self, x: calls.append(1) or int8_call(self, x))
    model, gen = shipped
    path = tmp_path / "doc.txt"
    path.write_text(gen.tokenizer.decode(gen.sample(20, 0).input_ids.tolist()))
    labels = []
    for flags in ([], ["--dtype", "bfloat16", "--quantize", "int8"]):
        assert main(["classify", "--model", str(DEFAULT_MODEL), "--input", str(path), "--json",
                     "--no-progress", *flags]) == 0
        labels.append(json.loads(capsys.readouterr().out.splitlines()[-1])["label"])
        assert bool(calls) == bool(flags)
    assert labels[0] == labels[1]
    for command in (["demo", "--tokens", "300"], ["bench", "--segments", "1", "--layers", "1", "--device", "cpu",
                                                  "--out", str(tmp_path / "bench")]):
        calls.clear()
        assert main([*command, "--dtype", "bfloat16", "--quantize", "int8"]) == 0 and calls, command
        if command[0] == "demo":                               # the summary line says int8 ran
            assert "torch.bfloat16 + int8 GEMMs" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["classify", "--model", str(DEFAULT_MODEL), "--input", str(path), "--quantize", "int4"])
    assert "--quantize: invalid choice: 'int4'" in capsys.readouterr().err


def test_a_rebuilt_plan_keeps_int8():
    """The Engine rebuilds its plan when the model changes: with the same options, int8 included."""
    from helpers import tiny_model
    from rmt_fast import Engine
    model = tiny_model()
    engine = Engine(model, dtype="bfloat16", quantize="int8")
    doc = [torch.randint(3, 60, (50,))]
    engine.classify(doc)
    before = list(engine.plan.int8_gemms)
    with torch.no_grad():
        model.model.classifier.bias.add_(1.0)
    engine.classify(doc)
    assert engine.refresh() is None and list(engine.plan.int8_gemms) == before and before
