"""The command line: ``rmt-fast COMMAND`` (or ``python -m rmt_fast COMMAND``).

Each command lives in the module that does its work and adds itself through ``add_cli(subparsers)``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from .cli_args import run_command

COMMAND_MODULES = ["rmt_fast.demo", "rmt_fast.bench", "rmt_fast.train", "rmt_fast.evaluate", "rmt_fast.analysis.flops",
                   "rmt_fast.analysis.attention_maps_cli", "rmt_fast.perfmodel"]


# -- classify -------------------------------------------------------------------------------------

def _add_classify(subparsers):
    p = subparsers.add_parser("classify", help="classify long text files")
    p.add_argument("--model", required=True, help="an rmt_fast model folder, or a reference model_best.pth")
    p.add_argument("--backbone-config", help="config.json (or folder) of a reference checkpoint's backbone")
    p.add_argument("--tokenizer", help="tokenizer folder or vocab.txt (default: the model folder's)")
    p.add_argument("--input", nargs="+", required=True, help="text files ('-' reads standard input)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="auto (the device's best, see rmt-fast info), float32, bfloat16 or float16")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8 GEMMs on the CPU (weights per channel, activations per token; docs/ARCHITECTURE.md)")
    p.add_argument("--attention", default="auto")
    p.add_argument("--batch-size", type=int, help="documents side by side (default 8, or the most --max-memory holds)")
    p.add_argument("--max-memory", help="device memory budget, e.g. 10GiB: the most slots whose predicted peak fits")
    p.add_argument("--empty", choices=["error", "special"], default="error",
                   help="an empty document is an error (default) or gets one segment of special tokens")
    p.add_argument("--decode-errors", choices=["strict", "replace"], default="strict",
                   help="files are UTF-8; 'strict' rejects a file with invalid bytes, 'replace' uses U+FFFD")
    p.add_argument("--json", action="store_true", help="print one JSON object per input")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_classify)


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


def run_classify(args) -> int:
    from .engine import Engine
    from .model import RMTForSequenceClassification
    from .tokenize import load_tokenizer

    model = RMTForSequenceClassification.load(args.model, backbone_config=args.backbone_config)
    tok_path = args.tokenizer or (args.model if Path(args.model).is_dir() else None)
    if tok_path is None:
        print("error: a reference checkpoint needs --tokenizer", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(tok_path)
    engine = Engine(model, device=args.device, dtype=args.dtype, attention=args.attention,
                    quantize=args.quantize, max_memory=args.max_memory)
    labels = model.config.label_names or tuple(str(i) for i in range(model.config.num_labels))
    done, failed = [0], [0]

    def print_result(i: int, logits, error) -> None:   # in input order, as soon as each is done
        done[0] += 1
        name = args.input[i]
        if error is not None:
            failed[0] += 1
            print(f"error: {name}: {error}", file=sys.stderr, flush=True)
            return
        p = logits.softmax(dim=-1)
        k = int(p.argmax())
        if args.json:
            print(json.dumps({"input": name, "label": labels[k],
                              "probabilities": {l: round(float(v), 6) for l, v in zip(labels, p)}}), flush=True)
        else:
            print(f"{name}\t{labels[k]}\t{float(p[k]):.4f}", flush=True)

    # Files are read, decoded and tokenized ahead on feeder threads while earlier segments compute; a
    # document that fails is named, and the others are still answered.
    sources = [_stdin() if p == "-" else Path(p) for p in args.input]
    try:
        engine.classify_stream(sources, tokenizer, names=args.input, batch_size=args.batch_size,
                               empty=args.empty, progress=not args.no_progress, errors=args.decode_errors,
                               on_error="nan", failures={}, on_result=print_result)
    except KeyboardInterrupt:
        print(f"interrupted: {done[0]} of {len(sources)} documents done", file=sys.stderr)
        return 130
    return 1 if failed[0] else 0


# -- info -----------------------------------------------------------------------------------------

def _add_info(subparsers):
    p = subparsers.add_parser("info", help="versions, devices and which backends work here")
    p.set_defaults(func=run_info)


def run_info(args) -> int:
    import platform

    import torch

    from .engine import backends

    def version(mod):
        try:
            return importlib.import_module(mod).__version__
        except Exception as e:  # noqa: BLE001 - report whatever stops the import
            return f"not available ({type(e).__name__}: {e})"

    print(f"python        {platform.python_version()}")
    for mod in ("rmt_fast", "torch", "transformers", "triton", "numpy", "safetensors"):
        print(f"{mod:<13} {version(mod)}")
    print(f"torch CUDA    {torch.version.cuda or 'CPU build'}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"cuda:{i}        {torch.cuda.get_device_name(i)}")
    else:
        print("cuda          no GPU visible")
    try:
        from . import _ext
        print(f"extension     {'built' if _ext.available() else 'not built: ' + str(_ext.why_unavailable())}"
              + (" (with CUDA)" if _ext.available() and _ext.built_with_cuda() else ""))
    except ImportError as e:
        print(f"extension     not available ({e})")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    from .engine.linear import packing_available
    from .engine.quant import check_quantize
    for dev in devices:
        for dtype in (torch.float32, torch.bfloat16):
            status = backends.available(torch.device(dev), dtype)
            cells = ", ".join(f"{k}: {'yes' if v is None else 'no (' + v + ')'}" for k, v in status.items())
            print(f"attention {dev}/{str(dtype).replace('torch.', '')}: {cells}")
            why_not = packing_available(torch.device(dev), dtype)
            print(f"packed linear {dev}/{str(dtype).replace('torch.', '')}: "
                  + ("yes (oneDNN)" if why_not is None else f"no ({why_not})"))
        try:
            print(f"int8 linear {dev}: yes, {check_quantize('int8', torch.device(dev))}")
        except ValueError as e:
            print(f"int8 linear {dev}: no ({e})")
    from . import envvars
    from .engine import device_policy   # what dtype="auto" and attention="auto" pick, and why
    print("\n".join(line for dev in devices for line in device_policy.describe(torch.device(dev))))
    print("environment (build, debug and test switches only):")
    print(envvars.describe())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rmt-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_classify(sub)
    _add_info(sub)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_cli(sub)
    return parser


def main(argv=None) -> int:
    """Parse and run one command; errors end as one line on stderr (see ``cli_args.run_command``)."""
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
