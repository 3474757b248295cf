"""``rmt-fast read`` and ``rmt-fast ask``: read a document once into a memory state file, then ask it questions.

``read`` records the model and tokenizer paths in the state file, so ``ask`` needs only ``--state``
(``--model``/``--tokenizer`` override them). A state from another model is refused by its fingerprint.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .cli_args import default_model_dir, device_name, dtype_name, positive_int


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("read", help="read a text file once into a memory state file (for 'ask')")
    p.add_argument("--model", default=str(default_model_dir()),
                   help="an rmt_fast model folder, or a reference model_best.pth (default: the shipped model)")
    p.add_argument("--backbone-config", help="config.json (or folder) of a reference checkpoint's backbone")
    p.add_argument("--tokenizer", help="tokenizer folder or vocab.txt (default: the model folder's)")
    p.add_argument("--input", required=True, help="a UTF-8 text file")
    p.add_argument("--state", required=True, help="the memory state file to write (e.g. doc.rmtstate)")
    p.add_argument("--append", action="store_true", help="go on reading from the state already in --state")
    p.add_argument("--device", type=device_name, default="cpu")
    p.add_argument("--dtype", type=dtype_name, default="auto",
                   help="auto (the device's best, see rmt-fast info), float32, bfloat16 or float16; recorded in --state")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_read)

    p = subparsers.add_parser("ask", help="answer questions about a document read with 'rmt-fast read'")
    p.add_argument("--state", required=True, help="a memory state file written by 'rmt-fast read'")
    p.add_argument("--question", action="append", default=[], help="a question (repeatable)")
    p.add_argument("--questions", help="a UTF-8 file of questions, one per line")
    p.add_argument("--model", help="the model (default: the one recorded in --state)")
    p.add_argument("--backbone-config", help="config.json (or folder) of a reference checkpoint's backbone")
    p.add_argument("--tokenizer", help="tokenizer folder or vocab.txt (default: the one recorded in --state)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--device", type=device_name, default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object per question")
    p.set_defaults(func=run_ask)


def _load(model_path, backbone_config, tokenizer_path):
    from .model import RMTForSequenceClassification
    from .tokenize import load_tokenizer

    model = RMTForSequenceClassification.load(model_path, backbone_config=backbone_config)
    tok = tokenizer_path or (model_path if Path(model_path).is_dir() else None)
    if tok is None:
        raise ValueError("a reference checkpoint needs --tokenizer")
    return model, load_tokenizer(tok), str(Path(tok).resolve())


def _read_text(path: str, flag: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag} {path}: not UTF-8 text (byte {e.start}): {e.reason}") from e
    except OSError as e:
        raise ValueError(f"{flag} {path}: {e.strerror or e}") from e


def run_read(args) -> int:
    from .engine import Engine
    from .memory_state import MemoryState

    previous = None
    if args.append:
        if not Path(args.state).is_file():
            raise ValueError(f"--append: --state {args.state} does not exist yet (drop --append to start it)")
        previous = MemoryState.load(args.state)
    model, tokenizer, tok_path = _load(args.model, args.backbone_config, args.tokenizer)
    engine = Engine(model, device=args.device, dtype=args.dtype)
    text = _read_text(args.input, "--input")
    state = engine.read(text, state=previous, tokenizer=tokenizer, progress=not args.no_progress)
    state.origin = {"model": str(Path(args.model).resolve()), "tokenizer": tok_path,
                    "backbone_config": args.backbone_config}
    state.save(args.state)
    print(f"{args.state}: {state.n_tokens:,} tokens read, {state.n_segments:,} segments, "
          f"{state.tail.numel()} in the tail", file=sys.stderr)
    return 0


def run_ask(args) -> int:
    from .engine import Engine
    from .memory_state import MemoryState

    questions = list(args.question)
    if args.questions:
        questions += [line for line in _read_text(args.questions, "--questions").splitlines() if line.strip()]
    if not questions:
        raise ValueError("give at least one --question or a --questions file")
    state = MemoryState.load(args.state)
    model_path = args.model or state.origin.get("model")
    if model_path is None:
        raise ValueError(f"--state {args.state} records no model: pass --model")
    model, tokenizer, _ = _load(model_path, args.backbone_config or state.origin.get("backbone_config"),
                                args.tokenizer or state.origin.get("tokenizer"))
    dtype, _, quantize = state.dtype.partition("+")           # e.g. 'float32+int8': computed the same way
    engine = Engine(model, device=args.device, dtype=dtype, **({"quantize": quantize} if quantize else {}))
    probs = engine.ask(state, questions, tokenizer=tokenizer, batch_size=args.batch_size).softmax(-1)
    labels = model.config.label_names or tuple(str(i) for i in range(model.config.num_labels))
    for q, p in zip(questions, probs):
        k = int(p.argmax())
        if args.json:
            print(json.dumps({"question": q, "label": labels[k],
                              "probabilities": {lab: round(float(v), 6) for lab, v in zip(labels, p)}}))
        else:
            print(f"{q}\t{labels[k]}\t{float(p[k]):.4f}")
    return 0
