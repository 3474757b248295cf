"""The FLOP estimate: appendix-F terms by hand, RMT linear in segments, full attention quadratic."""
import argparse
import json

import pytest

from rmt_fast.analysis import flops
from rmt_fast.analysis.flops import (OPT_CONFIGS, REPORT_LAYOUT, RMT_FAST_LAYOUT, ModelShape, RMTLayout,
                                     estimate_flops, forward_flops, resolve_shape, rmt_flops,
                                     shape_from_hf_config)

TINY = ModelShape("tiny", n_layers=2, d_model=8, n_heads=2, ffw_size=32, vocab_size=10)


def test_hand_count_of_a_small_config():
    # seq 4, d_model 8, 2 heads of key_size 4 (attention width 8), ffw 32, vocab 10, 2 layers.
    f = forward_flops(TINY, 4)
    assert f["embeddings"] == 2 * 4 * 10 * 8 == 640
    assert f["kqv"] == 2 * (2 * 3 * 4 * 8 * 8) == 3072
    assert f["attention_logits"] == 2 * (2 * 4 * 4 * 8) == 512
    assert f["softmax"] == 2 * (3 * 2 * 4 * 4) == 192
    assert f["reduction"] == 2 * (2 * 4 * 4 * 8) == 512
    assert f["output_projection"] == 2 * (2 * 4 * 8 * 8) == 1024
    assert f["dense"] == 2 * (2 * 4 * (2 * 8 * 32)) == 8192
    assert f["final_logits"] == 2 * 4 * 8 * 10 == 640
    # per layer 1536 + 256 + 96 + 256 + 512 + 4096 = 6752; two layers, plus embeddings and logits
    assert f["total"] == 640 + 2 * 6752 + 640 == 14784
    no_vocab = forward_flops(TINY, 4, include_embeddings=False, include_logits=False)
    assert no_vocab["total"] == 2 * 6752


def test_key_size_from_config_overrides_d_model_over_heads():
    s = ModelShape("k", n_layers=1, d_model=8, n_heads=2, ffw_size=8, vocab_size=4, key_size=3)
    assert forward_flops(s, 5)["attention_logits"] == 2 * 5 * 5 * 6


@pytest.mark.parametrize("layout", [RMT_FAST_LAYOUT, REPORT_LAYOUT, RMTLayout(24, 3, 3)])
def test_rmt_cost_is_exactly_linear_in_segments(layout):
    S = layout.segment_text_len
    one = rmt_flops(TINY, S, layout)
    assert one == forward_flops(TINY, layout.input_size)["total"]
    for k in (1, 2, 7, 499, 4096):
        assert rmt_flops(TINY, k * S, layout) == k * one
        # a partial last segment costs a whole one
        assert rmt_flops(TINY, k * S + 1, layout) == (k + 1) * one
        assert layout.n_segments(k * S + 1) == k + 1


def test_full_attention_has_the_quadratic_term_of_appendix_f():
    # forward(n) = a*n + b*n^2 with b = n_layers * (2*w + 3*h + 2*w): logits, softmax, reduction.
    b = TINY.n_layers * (2 * TINY.attn_width + 3 * TINY.n_heads + 2 * TINY.attn_width)
    f = lambda n: forward_flops(TINY, n)["total"]
    for n in (1, 2, 7, 100, 2_048_000):
        assert f(n) - 2 * f(n + 1) + f(n + 2) == 2 * b  # constant second difference
        assert f(2 * n) - 2 * f(n) == 2 * b * n * n


def test_opt_configs_have_their_parameter_counts():
    # 12 * n_layers * d_model^2 is the non-embedding parameter count of these GPT-style models.
    expect = {"OPT-125M": 85e6, "OPT-1.3B": 1.21e9, "OPT-6.7B": 6.44e9, "OPT-30B": 29.6e9,
              "OPT-66B": 65.2e9, "OPT-175B": 174e9}
    for name, n in expect.items():
        s = OPT_CONFIGS[name]
        assert s.ffw_size == 4 * s.d_model and s.vocab_size == 50272 and s.max_positions == 2048
        assert 12 * s.n_layers * s.d_model ** 2 == pytest.approx(n, rel=0.01)


def test_report_comparison_at_2048000_tokens():
    # The report: up to x295 fewer FLOPs (OPT-125M) and x29 for OPT-175B; see docs/RESULTS.md.
    big = estimate_flops("OPT-175B", 2_048_000, layout=REPORT_LAYOUT)
    small = estimate_flops("opt-125m", 2_048_000, layout=REPORT_LAYOUT)
    assert big.n_segments == 4000
    assert big.ratio == pytest.approx(28.5, abs=0.05)
    assert small.ratio == pytest.approx(223.4, abs=0.05)
    assert estimate_flops("125m", 2_048_000, layout=RMT_FAST_LAYOUT).n_segments == 4105
    assert small.rmt_relative == 4000 and small.full_relative > 8e5


def test_hf_config_json(tmp_path):
    opt = {"model_type": "opt", "num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12,
           "ffn_dim": 3072, "vocab_size": 50272, "max_position_embeddings": 2048}
    (tmp_path / "config.json").write_text(json.dumps(opt))
    s = resolve_shape(str(tmp_path))
    ref = OPT_CONFIGS["OPT-125M"]
    assert (s.n_layers, s.d_model, s.n_heads, s.ffw_size, s.vocab_size, s.key_size) == \
           (ref.n_layers, ref.d_model, ref.n_heads, ref.ffw_size, ref.vocab_size, ref.key_size)
    gpt2 = shape_from_hf_config({"n_layer": 2, "n_embd": 16, "n_head": 4, "n_inner": None, "vocab_size": 7})
    assert gpt2.ffw_size == 64
    with pytest.raises(ValueError, match="lacks"):
        shape_from_hf_config({"hidden_size": 4})
    with pytest.raises(ValueError, match="neither"):
        resolve_shape("no-such-model")


def test_cli_writes_table_json_and_figure(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    flops.add_cli(parser.add_subparsers())
    args = parser.parse_args(["flops", "--models", "OPT-125M,OPT-175B", "--lengths", "512,2048000",
                              "--layout", "report", "--out", str(tmp_path)])
    assert args.func(args) == 0
    assert "| OPT-175B | 2,048,000 | 4,000 |" in capsys.readouterr().out
    data = json.loads((tmp_path / "flops.json").read_text())
    assert [r["length"] for r in data["rows"]] == [512, 2048000, 512, 2048000]
    assert data["layout"] == {"input_size": 512, "num_mem_tokens": 0, "special_tokens": 0}
    assert (tmp_path / "flops.png").stat().st_size > 10_000
    bad = parser.parse_args(["flops", "--models", "nope", "--no-plot"])
    assert bad.func(bad) == 2
