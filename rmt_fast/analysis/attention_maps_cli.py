"""``rmt-fast attention-maps``: the document from a file or a generated task sample, the maps from
``attention_maps``, and the outputs: a printed table, ``attention_summary.json``, ``attention_maps.png``
and (optionally) ``attention_maps.pt``, each written atomically into a folder checked before any compute.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional, Union

import torch

from .. import files, plotting
from .. import tasks
from ..cli_args import check_output_dir, nonnegative_int, positive_int
from ..config import RMTConfig
from ..tokenize import load_tokenizer
from .attention_maps import (BACKGROUND, CLS, FACT, LABELS, MEMORY, PAD, QUESTION, SEP, AttentionMaps, Span,
                             attention_maps, find_token_spans)

LABEL_COLORS = {CLS: "#1f77b4", MEMORY: "#d62728", SEP: "#7f7f7f", BACKGROUND: "#f0f0f0",
                FACT: "#2ca02c", QUESTION: "#ff7f0e", PAD: "#ffffff"}
BUNDLED_TOKENIZER = Path(__file__).resolve().parent.parent / "data" / "bert-base-cased"


# -- output -------------------------------------------------------------------------------------

def format_summary(maps: AttentionMaps) -> str:
    """A markdown table of the memory rows' attention, one row per kept segment."""
    head = ("| segment | positions | fact tok | question tok | mem->fact | mem->memory | mem->[CLS]/[SEP] "
            "| mem->question | mem->background | question->mem |")
    lines = [head, "|" + "---:|" * (head.count("|") - 1)]
    for s in maps.segments:
        m, c = s.summary["memory_rows"], s.summary["counts"]
        q = s.summary["question_to_memory"]
        lines.append(f"| {s.segment} | {s.ids.numel()} | {c['fact']} | {c['question']} | {m['fact']:.3f} "
                     f"| {m['memory']:.3f} | {m['cls_sep']:.3f} | {m['question']:.3f} | {m['background']:.3f} "
                     f"| {'-' if q is None else f'{q:.3f}'} |")
    return "\n".join(lines)


def plot_attention_maps(maps: AttentionMaps, path: Union[str, os.PathLike], max_cols: int = 4,
                        tokenizer=None) -> None:
    """A grid of heatmaps, one per kept segment (and per layer/head when not averaged).

    A colour strip along the left (queries) and top (keys) marks [CLS], memory, [SEP], facts and the
    question; lines frame the memory rows.
    """
    plt = plotting.pyplot()
    from matplotlib.colors import ListedColormap, PowerNorm
    from matplotlib.patches import Patch

    names = maps.selection_names()
    panels = [(s, i) for s in maps.segments for i in range(len(names))]
    if not panels:
        raise ValueError("no segments to plot")
    ncols = min(max_cols, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 4.4 * nrows + 0.6), squeeze=False)
    label_cmap = ListedColormap([LABEL_COLORS[c] for c in range(len(LABELS))])
    M = maps.num_mem_tokens
    for ax, (s, i) in zip(axes.flat, panels):
        a = s.attention.reshape(-1, *s.attention.shape[-2:])[i].numpy()
        T = a.shape[-1]
        b = max(2.0, 0.04 * T)
        im = ax.imshow(a, cmap="viridis", norm=PowerNorm(0.5, vmin=0, vmax=max(float(a.max()), 1e-9)),
                       extent=(0, T, T, 0), interpolation="nearest")
        lab = s.labels.to(torch.int64).numpy()
        ax.imshow(lab[:, None], cmap=label_cmap, vmin=0, vmax=len(LABELS) - 1, extent=(-b, 0, T, 0),
                  interpolation="nearest", aspect="auto")
        ax.imshow(lab[None, :], cmap=label_cmap, vmin=0, vmax=len(LABELS) - 1, extent=(0, T, 0, -b),
                  interpolation="nearest", aspect="auto")
        for y in (1, M + 1):
            ax.axhline(y, color="w", lw=0.6)
        ax.set_xlim(-b, T)
        ax.set_ylim(T, -b)
        summ = s.summary["memory_rows"]
        ax.set_title(f"segment {s.segment} ({s.segment + 1} of {maps.n_segments})" +
                     ("" if maps.mean else f" · {names[i]}") +
                     f"\nmem→fact {summ['fact']:.2f}, →mem {summ['memory']:.2f}, →bg {summ['background']:.2f}",
                     fontsize=8)
        ax.set_xlabel("keys", fontsize=8)
        ax.set_ylabel("queries", fontsize=8)
        ax.tick_params(labelsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    legend = [Patch(color=LABEL_COLORS[c], label=LABELS[c]) for c in (CLS, MEMORY, SEP, FACT, QUESTION)]
    legend.append(Patch(facecolor=LABEL_COLORS[BACKGROUND], edgecolor="k", lw=0.3, label="background"))
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=8, frameon=False)
    fig.suptitle("Attention probabilities" + (f" ({names[0]})" if maps.mean else ""), fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    plotting.savefig(fig, path, dpi=90)


# -- CLI ----------------------------------------------------------------------------------------

def _index_list(text: str) -> Optional[List[int]]:
    if text.strip().lower() == "all":
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all' or comma-separated integers, got {text!r}")


def _span_list(text: str) -> List[Span]:
    out = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            a, b = part.split(":")
            out.append((int(a), int(b)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected START:END[,START:END...], got {text!r}")
    return out


def add_cli(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "attention-maps", help="attention maps of memory operations (report section 5, Figure 6)",
        description="Run a document segment by segment through the plain model and save the attention "
                    "probabilities of chosen layers/heads on chosen segments: a PNG grid, a JSON summary "
                    "and a printed table of what the memory rows attend to.")
    p.add_argument("--model", required=True,
                   help="an rmt_fast model directory, or a reference model_best.pth (with --backbone-config)")
    p.add_argument("--backbone-config", default=str(BUNDLED_TOKENIZER),
                   help="backbone config.json (or its directory) for a reference .pth; default bert-base-cased")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input",
                     help="the document: a text file, or a .json file holding a list of token ids or "
                          '{"input_ids": [...], "fact_spans": [[a, b], ...], "question_spans": [[a, b], ...]}')
    src.add_argument("--task", choices=("memorize", "detect", "reasoning"),
                     help="a generated sample of this rmt_fast.tasks task, facts and question marked "
                          "(the default, memorize, when --input is not given)")
    p.add_argument("--task-segments", type=positive_int, default=4, help="segments of the generated sample")
    p.add_argument("--task-split", default="test", choices=list(tasks.SPLITS), help="background split of the generated sample")
    p.add_argument("--task-seed", type=nonnegative_int, default=0)
    p.add_argument("--task-index", type=nonnegative_int, default=0, help="which sample of the generator")
    p.add_argument("--tokenizer",
                   help="tokenizer directory for text and tasks (default: the model directory's if it "
                        "has one, else the bundled bert-base-cased)")
    p.add_argument("--fact-spans", type=_span_list, default=[],
                   help="fact token ranges START:END (half-open) into the document's ids, comma-separated")
    p.add_argument("--question-spans", type=_span_list, default=[],
                   help="question token ranges START:END into the document's ids, comma-separated")
    p.add_argument("--fact-text", action="append", default=[],
                   help="mark every occurrence of this text's tokens as a fact (repeatable)")
    p.add_argument("--question-text", action="append", default=[],
                   help="mark every occurrence of this text's tokens as the question (repeatable)")
    p.add_argument("--layers", type=_index_list, default=None,
                   help="'all' or comma-separated layer indices (negative from the end); default all")
    p.add_argument("--heads", type=_index_list, default=None,
                   help="'all' or comma-separated head indices; default all")
    p.add_argument("--no-mean", action="store_true",
                   help="one map per chosen (layer, head) instead of their mean")
    p.add_argument("--segments", default="auto",
                   help="'auto' (segments with fact/question tokens, plus first and last), 'all', or "
                        "comma-separated segment indices (negative from the end)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--save-maps", action="store_true", help="also write the probabilities (attention_maps.pt)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _tokenizer_dir(args) -> str:
    if args.tokenizer:
        return args.tokenizer
    model = Path(args.model)
    if model.is_dir() and any((model / f).is_file() for f in ("vocab.txt", "tokenizer.json")):
        return str(model)
    return str(BUNDLED_TOKENIZER)


def _read_input(path: Path, tokenizer_dir: str):
    """(ids, fact_spans, question_spans, tokenizer or None) from a .json or text file."""
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:  # invalid JSON or UTF-8
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if isinstance(data, list):
            data = {"input_ids": data}
        if not isinstance(data, dict) or "input_ids" not in data:
            raise ValueError(f"{path}: expected a list of ids or an object with 'input_ids'")
        return (data["input_ids"], [tuple(s) for s in data.get("fact_spans", [])],
                [tuple(s) for s in data.get("question_spans", [])], None)
    tok = load_tokenizer(tokenizer_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 at byte {e.start}") from None
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids, [], [], tok


def _task_sample(args, config: RMTConfig, tokenizer_dir: str):
    """(ids, fact_spans, question_spans, tokenizer, description) of a generated task sample."""
    tok = tasks.load_tokenizer(tokenizer_dir)
    gen = tasks.TaskGenerator(args.task or "memorize", tok, config, split=args.task_split, seed=args.task_seed)
    s = gen.sample(args.task_segments, args.task_index)
    info = {"task": s.task, "facts": list(s.facts), "question": s.question, "answer": s.answer,
            "label": int(s.label), "n_segments": int(s.n_segments), "split": args.task_split,
            "seed": args.task_seed, "index": args.task_index}
    return s.input_ids, list(s.fact_spans), [tuple(s.question_span)], tok, info


def _predicted(maps: AttentionMaps, model) -> str:
    if maps.logits is None or maps.last_segment_run != maps.n_segments - 1:
        return "-"
    k = int(maps.logits.argmax())
    names = model.config.label_names
    return names[k] if names and k < len(names) else str(k)


def run(args) -> int:
    from ..model import RMTForSequenceClassification

    try:
        out = check_output_dir(args.out, "--out")  # a bad --out fails before the model runs
        if not args.no_plot:
            plotting.require_matplotlib()
        path = Path(args.model)
        model = RMTForSequenceClassification.load(path, backbone_config=None if path.is_dir() else args.backbone_config)
        tok_dir = _tokenizer_dir(args)
        task_info = None
        if args.input:
            ids, facts, questions, tok = _read_input(Path(args.input), tok_dir)
        else:
            ids, facts, questions, tok, task_info = _task_sample(args, model.config, tok_dir)
        facts = list(facts) + list(args.fact_spans)
        questions = list(questions) + list(args.question_spans)
        if args.fact_text or args.question_text:
            if tok is None:
                tok = load_tokenizer(tok_dir)
            for text, dest in [(t, facts) for t in args.fact_text] + [(t, questions) for t in args.question_text]:
                found = find_token_spans(ids, tok(text, add_special_tokens=False)["input_ids"])
                if not found:
                    flag = "--fact-text" if dest is facts else "--question-text"
                    raise ValueError(f"{flag} {text!r} does not occur in the document's tokens")
                dest.extend(found)
        seg = args.segments.strip().lower()
        segments = seg if seg in ("auto", "all") else _index_list(seg)
        maps = attention_maps(model, ids, facts, questions, layers=args.layers, heads=args.heads,
                              segments=segments, mean=not args.no_mean, progress=not args.quiet)
    except (ValueError, OSError, RuntimeError, argparse.ArgumentTypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # The table first: it survives a write that fails below.
    if task_info:
        print(f"{task_info['task']} sample: facts {task_info['facts']}, question {task_info['question']!r}, "
              f"answer {task_info['answer']}; predicted {_predicted(maps, model)}")
    print(f"{maps.n_segments} segments; kept {[s.segment for s in maps.segments]}; "
          f"{maps.selection_names()[0] if maps.mean else f'{len(maps.layers)} layers x {len(maps.heads)} heads'}")
    print(format_summary(maps), flush=True)
    return _write_outputs(maps, out, args, task_info)


def _write_outputs(maps: AttentionMaps, out: Path, args, task_info: Optional[dict]) -> int:
    meta = maps.to_dict()
    meta.update({"model": str(args.model), "input": args.input, "task": task_info})
    files.write_text(out / "attention_summary.json", json.dumps(meta, indent=2))
    written = [out / "attention_summary.json"]
    if not args.no_plot:
        plot_attention_maps(maps, out / "attention_maps.png")
        written.append(out / "attention_maps.png")
    if args.save_maps:
        with files.atomic_path(out / "attention_maps.pt") as tmp:
            torch.save({"layers": maps.layers, "heads": maps.heads, "mean": maps.mean,
                        "segments": [{"segment": s.segment, "ids": s.ids, "labels": s.labels,
                                      "attention": s.attention} for s in maps.segments]}, tmp)
        written.append(out / "attention_maps.pt")
    print("wrote " + ", ".join(str(w) for w in written))
    return 0
