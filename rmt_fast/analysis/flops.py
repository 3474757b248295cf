"""Forward-pass FLOPs of full attention against RMT, the report's section 2.1 and Figure 3.

Counting follows Hoffmann et al. (2022), "Training Compute-Optimal Large Language Models", appendix F,
term by term (``key_size * n_heads`` is the attention width, ``ffw_size`` the dense block's width):

    embeddings           2 * seq * vocab * d_model
    per layer:
      KQV projections    2 * 3 * seq * d_model * (key_size * n_heads)
      attention logits   2 * seq * seq * (key_size * n_heads)
      softmax            3 * n_heads * seq * seq
      reduction          2 * seq * seq * (key_size * n_heads)
      output projection  2 * seq * (key_size * n_heads) * d_model
      dense block        2 * seq * (2 * d_model * ffw_size)
    final logits         2 * seq * d_model * vocab

    forward = embeddings + n_layers * (per layer) + final logits

As in the appendix, layer norms, biases, non-linearities and position embeddings are not counted.

Full attention runs the model once over all L tokens (hypothetically: OPT's learned positions stop at
2048, as in the report). RMT runs it once per segment over ``input_size`` positions, memory tokens and
special tokens included, and there are ``ceil(L / segment_text_len)`` segments, where
``segment_text_len = input_size - num_mem_tokens - special_tokens``. Every segment is charged the
full ``input_size`` (the last one is padded, as in rmt_fast's batches), so RMT's cost is exactly
``n_segments * forward(input_size)``.

Two layouts are built in: ``REPORT_LAYOUT`` charges one 512-position pass per 512 text tokens
(4,000 segments at 2,048,000 tokens: the report's Figure 3 axis), ``RMT_FAST_LAYOUT`` is this
project's model (512 positions = [CLS] + 10 memory + [SEP] + 499 text + [SEP]; 4,105 segments).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

from .. import files, plotting
from ..cli_args import check_output_dir, nonnegative_int, positive_int, positive_int_list

TERMS = ("embeddings", "kqv", "attention_logits", "softmax", "reduction", "output_projection",
         "dense", "final_logits")
PER_LAYER_TERMS = TERMS[1:-1]
# The lengths of the printed table; the figure uses a dense grid of its own (FIGURE_LENGTHS).
DEFAULT_LENGTHS = (512, 1024, 2048, 4096, 8192, 16_000, 32_000, 64_000, 128_000, 256_000, 512_000,
                   1_024_000, 2_048_000)
PANEL_SPLIT = 32_000
MIN_LENGTH, MAX_LENGTH = 512, 2_048_000


@dataclass(frozen=True)
class ModelShape:
    """The sizes the FLOP count needs; ``key_size`` defaults to ``d_model // n_heads``."""

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    ffw_size: int
    vocab_size: int
    max_positions: Optional[int] = None
    key_size: Optional[int] = None

    def __post_init__(self):
        for f in ("n_layers", "d_model", "n_heads", "ffw_size", "vocab_size"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ModelShape {self.name!r}: {f} must be a positive int, got {v!r}")
        if self.key_size is None:
            if self.d_model % self.n_heads:
                raise ValueError(f"ModelShape {self.name!r}: d_model {self.d_model} is not divisible by "
                                 f"n_heads {self.n_heads}; give key_size")
            object.__setattr__(self, "key_size", self.d_model // self.n_heads)
        elif not isinstance(self.key_size, int) or self.key_size < 1:
            raise ValueError(f"ModelShape {self.name!r}: key_size must be a positive int, got {self.key_size!r}")

    @property
    def attn_width(self) -> int:
        return self.key_size * self.n_heads


def _opt(name, n_layers, d_model, n_heads, ffw_size):
    return ModelShape(name, n_layers, d_model, n_heads, ffw_size, vocab_size=50272, max_positions=2048)


# Zhang et al. (2022), "OPT: Open Pre-trained Transformer Language Models", Table 1; vocab and positions
# from the released Hugging Face configs. (OPT-350M's 512-wide embedding projection is not modelled.)
OPT_CONFIGS: Dict[str, ModelShape] = {s.name: s for s in (
    _opt("OPT-125M", 12, 768, 12, 3072),
    _opt("OPT-350M", 24, 1024, 16, 4096),
    _opt("OPT-1.3B", 24, 2048, 32, 8192),
    _opt("OPT-2.7B", 32, 2560, 32, 10240),
    _opt("OPT-6.7B", 32, 4096, 32, 16384),
    _opt("OPT-13B", 40, 5120, 40, 20480),
    _opt("OPT-30B", 48, 7168, 56, 28672),
    _opt("OPT-66B", 64, 9216, 72, 36864),
    _opt("OPT-175B", 96, 12288, 96, 49152),
)}
# The five sizes the report's Figure 3 draws.
FIGURE3_MODELS = ("OPT-125M", "OPT-1.3B", "OPT-6.7B", "OPT-30B", "OPT-175B")


@dataclass(frozen=True)
class RMTLayout:
    """How RMT cuts the input: every segment is a pass over ``input_size`` positions."""

    input_size: int = 512
    num_mem_tokens: int = 10
    special_tokens: int = 3

    def __post_init__(self):
        for f in ("input_size", "num_mem_tokens", "special_tokens"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"RMTLayout: {f} must be a non-negative int, got {v!r}")
        if self.segment_text_len < 1:
            raise ValueError(f"RMTLayout: input_size {self.input_size} leaves no text after "
                             f"{self.num_mem_tokens} memory and {self.special_tokens} special tokens")

    @property
    def segment_text_len(self) -> int:
        return self.input_size - self.num_mem_tokens - self.special_tokens

    def n_segments(self, length: int) -> int:
        return -(-length // self.segment_text_len)


REPORT_LAYOUT = RMTLayout(512, 0, 0)
RMT_FAST_LAYOUT = RMTLayout(512, 10, 3)
LAYOUTS = {"report": REPORT_LAYOUT, "rmt-fast": RMT_FAST_LAYOUT}


# -- configs ------------------------------------------------------------------------------------

_HF_KEYS = {
    "n_layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "d_model": ("hidden_size", "d_model", "n_embd", "dim"),
    "n_heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "ffw_size": ("intermediate_size", "ffn_dim", "n_inner", "d_ff", "hidden_dim"),
    "vocab_size": ("vocab_size",),
    "max_positions": ("max_position_embeddings", "n_positions", "n_ctx"),
    "key_size": ("head_dim", "d_kv"),
}


def shape_from_hf_config(config: Union[dict, str, os.PathLike], name: Optional[str] = None) -> ModelShape:
    """A ModelShape from a Hugging Face config: a dict, a ``config.json`` path, or a directory holding one.

    ``ffw_size`` defaults to ``4 * d_model`` where the config leaves it out (GPT-2's ``n_inner: null``).
    """
    if not isinstance(config, dict):
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no Hugging Face config at {path}")
        name = name or path.parent.name or path.stem
        config = json.loads(path.read_text(encoding="utf-8"))
        if "backbone" in config and "rmt" in config:  # an rmt_fast checkpoint directory
            config = config["backbone"]
    found = {}
    for field, keys in _HF_KEYS.items():
        found[field] = next((config[k] for k in keys if config.get(k) is not None), None)
    missing = [f for f in ("n_layers", "d_model", "n_heads", "vocab_size") if found[f] is None]
    if missing:
        raise ValueError(f"config {name or ''} lacks {missing} (looked for "
                         f"{[_HF_KEYS[f] for f in missing]})")
    if found["ffw_size"] is None:
        found["ffw_size"] = 4 * found["d_model"]
    return ModelShape(name=name or config.get("model_type", "model"), **found)


def resolve_shape(spec: Union[str, os.PathLike, ModelShape, dict]) -> ModelShape:
    """A built-in OPT name (``OPT-125M``, ``opt-125m``, ``125m``), a HF config path or dict, or a ModelShape."""
    if isinstance(spec, ModelShape):
        return spec
    if isinstance(spec, dict):
        return shape_from_hf_config(spec)
    key = str(spec).strip()
    by_lower = {k.lower(): v for k, v in OPT_CONFIGS.items()}
    for candidate in (key.lower(), f"opt-{key.lower()}"):
        if candidate in by_lower:
            return by_lower[candidate]
    if Path(key).exists():
        return shape_from_hf_config(key)
    raise ValueError(f"{spec!r} is neither a built-in config ({', '.join(OPT_CONFIGS)}) nor a path to a "
                     "Hugging Face config.json")


# -- the count ----------------------------------------------------------------------------------

def forward_flops(shape: ModelShape, seq_len: int, include_embeddings: bool = True,
                  include_logits: bool = True) -> Dict[str, int]:
    """Appendix-F forward FLOPs of one pass over ``seq_len`` tokens, term by term, plus ``total``.

    Per-layer terms are already multiplied by ``n_layers``. Python ints: exact at any length.
    """
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    s, d, w, h = seq_len, shape.d_model, shape.attn_width, shape.n_heads
    per_layer = {
        "kqv": 2 * 3 * s * d * w,
        "attention_logits": 2 * s * s * w,
        "softmax": 3 * h * s * s,
        "reduction": 2 * s * s * w,
        "output_projection": 2 * s * w * d,
        "dense": 2 * s * (2 * d * shape.ffw_size),
    }
    out = {"embeddings": 2 * s * shape.vocab_size * d if include_embeddings else 0}
    out.update({k: shape.n_layers * v for k, v in per_layer.items()})
    out["final_logits"] = 2 * s * d * shape.vocab_size if include_logits else 0
    out["total"] = sum(out[t] for t in TERMS)
    return out


def full_attention_flops(shape: ModelShape, length: int, **kw) -> int:
    """One pass of the whole input through the model."""
    return forward_flops(shape, length, **kw)["total"]


def rmt_flops(shape: ModelShape, length: int, layout: RMTLayout = RMT_FAST_LAYOUT, **kw) -> int:
    """``n_segments`` passes over ``input_size`` positions each: exactly linear in the segment count."""
    return layout.n_segments(length) * forward_flops(shape, layout.input_size, **kw)["total"]


@dataclass
class FlopEstimate:
    model: str
    length: int
    n_segments: int
    full_flops: int
    rmt_flops: int
    full_relative: float   # full-attention FLOPs / one 512-token (baseline) pass
    rmt_relative: float    # RMT FLOPs / the same baseline
    ratio: float           # full / RMT: how many times fewer FLOPs RMT needs

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def estimate_flops(config, length: int, layout: RMTLayout = RMT_FAST_LAYOUT, baseline_len: int = 512,
                   include_embeddings: bool = True, include_logits: bool = True) -> FlopEstimate:
    """Full attention against RMT at one input length.

    config: a built-in OPT name, a HF config path or dict, or a ModelShape. Both costs are also given
    relative to one full-attention pass over ``baseline_len`` tokens (the report's y-axis).
    """
    shape = resolve_shape(config)
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    kw = dict(include_embeddings=include_embeddings, include_logits=include_logits)
    full = full_attention_flops(shape, length, **kw)
    rmt = rmt_flops(shape, length, layout, **kw)
    base = full_attention_flops(shape, baseline_len, **kw)
    return FlopEstimate(model=shape.name, length=length, n_segments=layout.n_segments(length),
                        full_flops=full, rmt_flops=rmt, full_relative=full / base, rmt_relative=rmt / base,
                        ratio=full / rmt)


def scaling_table(configs: Iterable = FIGURE3_MODELS, lengths: Iterable[int] = DEFAULT_LENGTHS,
                  **kw) -> List[FlopEstimate]:
    """estimate_flops for every config and length, config-major."""
    return [estimate_flops(c, int(n), **kw) for c in configs for n in lengths]


def figure_lengths(points_per_panel: int = 64) -> List[int]:
    """512..32,000 evenly spaced, then 32,000..2,048,000 evenly spaced, as the report's two panels."""
    a = [round(MIN_LENGTH + i * (PANEL_SPLIT - MIN_LENGTH) / (points_per_panel - 1)) for i in range(points_per_panel)]
    b = [round(PANEL_SPLIT + i * (MAX_LENGTH - PANEL_SPLIT) / (points_per_panel - 1))
         for i in range(1, points_per_panel)]
    return sorted(set(a + b))


# -- output -------------------------------------------------------------------------------------

def format_table(rows: Sequence[FlopEstimate]) -> str:
    """A markdown table: one row per (model, length)."""
    lines = ["| model | tokens | RMT segments | full-attention FLOPs | RMT FLOPs | full / 512 | RMT / 512 "
             "| full / RMT |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.model} | {r.length:,} | {r.n_segments:,} | {r.full_flops:.3e} | {r.rmt_flops:.3e} "
                     f"| {r.full_relative:,.1f} | {r.rmt_relative:,.1f} | {r.ratio:,.1f} |")
    return "\n".join(lines)


def plot_scaling(configs: Sequence, path: Union[str, os.PathLike], layout: RMTLayout = RMT_FAST_LAYOUT,
                 points_per_panel: int = 64, **kw) -> None:
    """The report's Figure 3: FLOPs relative to a 512-token pass, (a) 512..32,000, (b) 32,000..2,048,000.

    Solid lines are full attention, dashed lines RMT, one colour per model.
    """
    plt = plotting.pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    lengths = figure_lengths(points_per_panel)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = []
    for i, cfg in enumerate(configs):
        rows = [estimate_flops(cfg, n, layout=layout, **kw) for n in lengths]
        c = colors[i % len(colors)]
        for ax, lo, hi in ((axes[0], MIN_LENGTH, PANEL_SPLIT), (axes[1], PANEL_SPLIT, MAX_LENGTH)):
            sel = [r for r in rows if lo <= r.length <= hi]
            x = [r.length for r in sel]
            ax.plot(x, [r.full_relative for r in sel], color=c)
            ax.plot(x, [r.rmt_relative for r in sel], color=c, ls="--")
        last = rows[-1]
        axes[1].annotate(f"x{last.ratio:.0f}", (last.length, last.full_relative), xytext=(4, 0),
                         textcoords="offset points", va="center", fontsize=8, color=c)
        handles.append(Line2D([], [], color=c, label=last.model))
    handles += [Line2D([], [], color="k", label="full attention"),
                Line2D([], [], color="k", ls="--", label="RMT")]

    def tokens(x, _):
        return f"{x / 1e6:g}M" if x >= 1e6 else (f"{x / 1e3:g}k" if x >= 1e3 else f"{x:g}")

    titles = ("a: 512 to 32,000 tokens", "b: 32,000 to 2,048,000 tokens (x: full / RMT at 2,048,000)")
    for ax, title in zip(axes, titles):
        ax.set_yscale("log")
        ax.set_xlabel("input size, tokens")
        ax.set_ylabel("FLOPs relative to one 512-token pass")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.xaxis.set_major_formatter(FuncFormatter(tokens))
    axes[1].set_xlim(0, MAX_LENGTH * 1.12)
    axes[0].legend(handles=handles, fontsize=8, loc="upper left")
    fig.suptitle(f"Forward FLOPs (Hoffmann et al. 2022, app. F): RMT segments of {layout.input_size} positions, "
                 f"{layout.segment_text_len} text tokens each")
    fig.tight_layout()
    plotting.savefig(fig, path, dpi=120)


# -- CLI ----------------------------------------------------------------------------------------

def add_cli(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "flops", help="forward FLOPs of full attention vs RMT (report section 2.1, Figure 3)",
        description="Forward-pass FLOPs (Hoffmann et al. 2022, appendix F) of a full-attention model "
                    "on the whole input against RMT's fixed segments, for OPT configs or HF config.json files.")
    p.add_argument("--models", default=",".join(FIGURE3_MODELS),
                   help="comma-separated built-in names (" + ", ".join(OPT_CONFIGS) + "), 'all', or paths "
                        "to Hugging Face config.json files / model directories (default: Figure 3's five)")
    p.add_argument("--figure-models",
                   help="the models drawn in flops.png, same syntax as --models (default: --models)")
    p.add_argument("--lengths", type=positive_int_list, default=list(DEFAULT_LENGTHS),
                   help="comma-separated input lengths in tokens for the table")
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="rmt-fast",
                   help="'rmt-fast': 512 positions = 10 memory + 3 special + 499 text; 'report': 512 text "
                        "tokens per 512-position pass (the report's Figure 3 axis)")
    p.add_argument("--input-size", type=positive_int, help="positions per RMT segment (overrides the layout)")
    p.add_argument("--num-mem-tokens", type=nonnegative_int, help="memory tokens per segment (overrides the layout)")
    p.add_argument("--special-tokens", type=nonnegative_int, help="special tokens per segment (overrides the layout)")
    p.add_argument("--no-embeddings", action="store_true", help="leave out the input-embedding term")
    p.add_argument("--no-logits", action="store_true", help="leave out the final-logits term")
    p.add_argument("--out", help="directory for flops.json, flops.md and flops.png")
    p.add_argument("--no-plot", action="store_true", help="skip the figure")
    p.set_defaults(func=run)
    return p


def _shapes(spec: str) -> List[ModelShape]:
    names = list(OPT_CONFIGS) if spec.strip().lower() == "all" else [m.strip() for m in spec.split(",") if m.strip()]
    if not names:
        raise ValueError("no models given")
    return [resolve_shape(m) for m in names]


def run(args) -> int:
    base = LAYOUTS[args.layout]
    try:
        layout = RMTLayout(
            input_size=args.input_size if args.input_size is not None else base.input_size,
            num_mem_tokens=args.num_mem_tokens if args.num_mem_tokens is not None else base.num_mem_tokens,
            special_tokens=args.special_tokens if args.special_tokens is not None else base.special_tokens)
        shapes = _shapes(args.models)
        figure_shapes = _shapes(args.figure_models) if args.figure_models else shapes
        out = check_output_dir(args.out, "--out") if args.out else None
        if out is not None and not args.no_plot:
            plotting.require_matplotlib()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kw = dict(layout=layout, include_embeddings=not args.no_embeddings, include_logits=not args.no_logits)
    rows = scaling_table(shapes, args.lengths, **kw)
    table = format_table(rows)
    print(f"layout: {layout.input_size} positions per segment, {layout.num_mem_tokens} memory + "
          f"{layout.special_tokens} special + {layout.segment_text_len} text tokens; "
          f"embeddings {'in' if kw['include_embeddings'] else 'out'}, "
          f"final logits {'in' if kw['include_logits'] else 'out'}")
    print(table, flush=True)
    if out is not None:
        meta = {"method": "Hoffmann et al. 2022 appendix F, forward pass",
                "layout": dataclasses.asdict(layout), "segment_text_len": layout.segment_text_len,
                "include_embeddings": kw["include_embeddings"], "include_logits": kw["include_logits"],
                "baseline_len": 512, "models": [dataclasses.asdict(s) for s in shapes],
                "rows": [r.to_dict() for r in rows]}
        files.write_text(out / "flops.json", json.dumps(meta, indent=2))
        files.write_text(out / "flops.md", table + "\n")
        if not args.no_plot:
            plot_scaling(figure_shapes, out / "flops.png", **kw)
        print(f"wrote {out / 'flops.json'}, {out / 'flops.md'}" + ("" if args.no_plot else f", {out / 'flops.png'}"))
    return 0
