"""``rmt-fast classify``: classify long text files, one process or many (torchrun), into a resumable file.

Without ``--output`` each result is printed as soon as it and every earlier one are done. With
``--output results.jsonl`` each is appended to that file as one JSON line (see ``results_file``); a
rerun skips what the file already answers. Under ``torchrun`` every process takes every world-th of
the inputs still to answer, and rank 0 merges the processes' results in input order at the end, so
the file is the one a single process writes.

With ``--checkpoint-dir DIR`` each document's memory is also saved every ``--checkpoint-every N``
segments (and its logits once finished), so a rerun of the same command resumes a long document where
it was saved instead of from its start (engine/run_checkpoints.py); DIR is removed when the run ends,
unless ``--keep-checkpoints``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

from . import distributed
from .cli_args import check_output_dir, default_model_dir, device_name, dtype_name, in_flags, positive_int
from .results_file import ResultsFile


def add_cli(subparsers):
    p = subparsers.add_parser("classify", help="classify long text files",
                              description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("--model", default=str(default_model_dir()),
                   help="an rmt_fast model folder, or a reference model_best.pth (default: the shipped default model)")
    p.add_argument("--backbone-config", help="config.json (or folder) of a reference checkpoint's backbone")
    p.add_argument("--tokenizer", help="tokenizer folder or vocab.txt (default: the model folder's)")
    p.add_argument("--input", nargs="+", default=[], help="text files ('-' reads standard input)")
    p.add_argument("--input-list", help="a file of input paths, one per line (blank lines skipped), "
                                        "classified after any --input")
    p.add_argument("--output", help="write one JSON line per input, in input order, to this file as results "
                                    "complete; a rerun resumes where it stopped")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", default=True,
                       help="skip the inputs --output already answers (the default)")
    group.add_argument("--overwrite", action="store_true", help="discard an existing --output and start over")
    p.add_argument("--device", type=device_name, default="cpu", help="cpu or cuda (under torchrun: each process its LOCAL_RANK GPU)")
    p.add_argument("--dtype", type=dtype_name, default="auto", help="auto (the device's best, see rmt-fast info), float32, bfloat16 or float16")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8 GEMMs on the CPU (weights per channel, activations per token; docs/ARCHITECTURE.md)")
    p.add_argument("--attention", default="auto",
                   help="auto (the best the device runs, see rmt-fast info), cpp, sdpa, matmul or triton")
    p.add_argument("--batch-size", type=positive_int,
                   help="documents side by side (default 8, or the most --max-memory holds)")
    p.add_argument("--max-memory", help="device memory budget, e.g. 10GiB: the most slots whose predicted peak fits")
    p.add_argument("--empty", choices=["error", "special"], default="error",
                   help="an empty document is an error (default) or gets one segment of special tokens")
    p.add_argument("--decode-errors", choices=["strict", "replace"], default="strict",
                   help="files are UTF-8; 'strict' rejects a file with invalid bytes, 'replace' uses U+FFFD")
    p.add_argument("--checkpoint-dir", help="save each document's memory here every --checkpoint-every segments, "
                                            "and its logits once done: a rerun of the same command resumes each "
                                            "unfinished document where it was saved and skips finished ones")
    p.add_argument("--checkpoint-every", type=positive_int,
                   help="segments between a document's saves (default 64; needs --checkpoint-dir)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep --checkpoint-dir when the run ends (default: removed once every input is answered)")
    p.add_argument("--json", action="store_true", help="print one JSON object per input")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_classify)
    return p


class _ClosedStdin:
    """Standard input where there is none (``<&-``): a bad input like any other, named when read."""

    def __iter__(self):
        raise OSError("standard input is closed")


def _stdin():
    """Standard input's unbuffered bytes: a tokenizer thread still blocked reading an idle pipe at exit
    (after Ctrl-C) holds no buffer lock, which would abort the interpreter's shutdown."""
    stdin = sys.stdin
    if stdin is None or not hasattr(stdin, "buffer"):
        return _ClosedStdin()
    return getattr(stdin.buffer, "raw", stdin.buffer)


def input_names(args) -> List[str]:
    """--input then --input-list's lines, in that order; at least one."""
    names = list(args.input)
    if args.input_list:
        try:
            text = Path(args.input_list).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--input-list {args.input_list}: cannot read it ({getattr(e, 'strerror', None) or e})")
        names += [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    if not names:
        raise ValueError("no inputs: give files with --input or a list of them with --input-list")
    return names


class _Sizes:
    """Text tokens and segments the model reads of a file (its ids without specials, cut at
    max_n_segments, segmented as the Engine does); None for standard input, which cannot be read twice."""

    def __init__(self, tokenizer, config, empty: str, errors: str):
        self.tokenizer, self.config, self.empty, self.errors = tokenizer, config, empty, errors

    def __call__(self, name: str):
        from . import segmentation
        from .tokenize import tokenize_long

        if name == "-":
            return None, None
        text = Path(name).read_bytes().decode("utf-8-sig", errors=self.errors)
        docs = segmentation.clean_and_truncate([tokenize_long(text, self.tokenizer)], self.config)
        segs = segmentation.cut(docs, self.config, empty_as_one_segment=self.empty == "special")
        return int(docs.lengths[0]), len(segs.length)


def _record(index: int, name: str, logits, error: Optional[str], labels, sizes) -> dict:
    """One line of the results file. logits [num_labels] float32 (NaN where the document failed)."""
    rec = {"index": index, "input": name, "label": None, "probabilities": None, "logits": None,
           "segments": None, "tokens": None, "error": error}
    if error is None:
        p = logits.softmax(dim=-1)
        rec.update(label=labels[int(p.argmax())], probabilities={l: float(v) for l, v in zip(labels, p)},
                   logits=[float(v) for v in logits])
        try:
            rec["tokens"], rec["segments"] = sizes(name)
        except (OSError, ValueError):     # changed since it was classified; the result itself stands
            pass
    return rec


def _device(device: str) -> str:
    """Under torchrun on CUDA, each process takes its node-local GPU."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        import torch

        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return device


def check_checkpoint_flags(args) -> None:
    """The checkpoint flags, before any compute: N needs DIR, and DIR must be a writable folder."""
    if args.checkpoint_dir is None:
        if args.checkpoint_every is not None or args.keep_checkpoints:
            raise ValueError("--checkpoint-every and --keep-checkpoints need --checkpoint-dir")
        return
    check_output_dir(args.checkpoint_dir, "--checkpoint-dir")


def run_classify(args) -> int:
    names = input_names(args)
    check_checkpoint_flags(args)
    created = distributed.init_process_group(args.device)
    try:
        return _classify(args, names)
    finally:
        distributed.destroy_process_group(created)


def _classify(args, names: List[str]) -> int:
    from .engine import Engine
    from .engine.run_checkpoints import remove as remove_checkpoints, summary
    from .model import RMTForSequenceClassification
    from .tokenize import load_tokenizer

    rank, world = distributed.rank_and_world()
    if world > 1 and not args.output:
        raise ValueError("under torchrun, give --output: the processes' results are merged into that file")
    model = RMTForSequenceClassification.load(args.model, backbone_config=args.backbone_config)
    tok_path = args.tokenizer or (args.model if Path(args.model).is_dir() else None)
    if tok_path is None:
        raise ValueError("a reference checkpoint (--model FILE.pth) needs --tokenizer")
    tokenizer = load_tokenizer(tok_path)
    engine = Engine(model, device=_device(args.device), dtype=args.dtype, attention=args.attention,
                    quantize=args.quantize, max_memory=args.max_memory)
    labels = model.config.label_names or tuple(str(i) for i in range(model.config.num_labels))

    results = ResultsFile(args.output, names) if args.output else None
    if results is not None:
        if rank == 0:
            results.start(overwrite=args.overwrite)
        distributed.barrier()                      # every rank sees the folded file
        todo = results.pending()[rank::world]
        distributed.barrier()                      # no rank writes while another still reads the files
        out = results.writer(rank, world)
    else:
        todo, out = list(range(len(names))), None
    sizes = _Sizes(tokenizer, model.config, args.empty, args.decode_errors)
    done, failed = [0], [0]

    def on_result(i: int, logits, error) -> None:   # in this process's input order, as soon as each is done
        index = todo[i]
        error = None if error is None else in_flags(error)
        done[0] += 1
        failed[0] += error is not None
        if out is not None:
            out.write(_record(index, names[index], logits, error, labels, sizes))
        elif error is not None:
            print(f"error: {names[index]}: {error}", file=sys.stderr, flush=True)
        else:
            _print(names[index], logits, labels, args.json)

    # Files are read, decoded and tokenized ahead on feeder threads while earlier segments compute; a
    # document that fails is named, and the others are still answered.
    sources = [_stdin() if names[i] == "-" else Path(names[i]) for i in todo]
    report: dict = {}      # checkpoint counts; files are named by input index, whatever --output skips
    try:
        if sources:
            engine.classify_stream(sources, tokenizer, names=[names[i] for i in todo], batch_size=args.batch_size,
                                   empty=args.empty, progress=not args.no_progress and rank == 0,
                                   errors=args.decode_errors, on_error="nan", failures={}, on_result=on_result,
                                   checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                                   keep_checkpoints=args.keep_checkpoints, checkpoint_keys=todo,
                                   checkpoint_report=report)
    except KeyboardInterrupt:
        print(f"interrupted: {done[0]} of {len(sources)} documents done"
              + (f"; rerun the same command to resume {args.output}" if args.output else "")
              + (f"; {args.checkpoint_dir} kept to resume the rest" if args.checkpoint_dir else ""), file=sys.stderr)
        return 130
    finally:
        if out is not None:
            out.close()

    def say_checkpoints() -> None:
        if report:
            report["kept"] = Path(args.checkpoint_dir).exists()
            print(summary(report, lambda i: names[todo[i]]), file=sys.stderr)
    if results is None:
        say_checkpoints()
        return 1 if failed[0] else 0
    computed = int(distributed.all_reduce([len(todo)], engine.device)[0])   # also: every part file is complete
    if rank != 0:
        say_checkpoints()
        return 0
    results.finish()
    if args.checkpoint_dir and not args.keep_checkpoints:     # inputs --output answered before are done too
        remove_checkpoints(args.checkpoint_dir, range(len(names)))
    say_checkpoints()
    errors = [r for r in results.records() if r["error"] is not None]
    for r in errors:
        print(f"error: {r['input']}: {r['error']}", file=sys.stderr)
    print(f"{args.output}: {len(names)} results ({computed} computed now, {len(names) - computed} from an "
          f"earlier run), {len(errors)} failed", file=sys.stderr)
    return 1 if errors else 0


def _print(name: str, logits, labels, as_json: bool) -> None:
    p = logits.softmax(dim=-1)
    k = int(p.argmax())
    if as_json:
        print(json.dumps({"input": name, "label": labels[k],
                          "probabilities": {l: round(float(v), 6) for l, v in zip(labels, p)}}), flush=True)
    else:
        print(f"{name}\t{labels[k]}\t{float(p[k]):.4f}", flush=True)
