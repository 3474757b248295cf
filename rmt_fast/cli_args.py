"""Checks of command-line values, run by argparse at parse time so a bad value never reaches any compute.

Each type function raises ``argparse.ArgumentTypeError``; argparse prefixes the message with the flag
(``argument --samples: must be a positive integer, got '-3'``) and exits with status 2.
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Callable, List


def int_at_least(low: int) -> Callable[[str], int]:
    """An integer >= ``low``."""
    what = {0: "a non-negative integer", 1: "a positive integer"}.get(low, f"an integer >= {low}")

    def parse(text: str) -> int:
        try:
            value = int(text.replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = "int"
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def float_in(low: float, high: float = math.inf, low_open: bool = False) -> Callable[[str], float]:
    """A finite float in [low, high] (or (low, high] when ``low_open``)."""
    what = f"a number {'>' if low_open else '>='} {low:g}" + ("" if high == math.inf else f" and <= {high:g}")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (low_open and value == low) or value > high:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = "float"
    return parse


positive_float = float_in(0.0, low_open=True)
nonnegative_float = float_in(0.0)


def positive_int_list(text: str) -> List[int]:
    """Comma-separated positive integers, at least one."""
    try:
        values = [int(x.strip().replace("_", "")) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers, got {text!r}")
    return values


DTYPE_NAMES = ("auto", "float32", "fp32", "float", "bfloat16", "bf16", "float16", "fp16", "half")


def dtype_name(text: str) -> str:
    """A --dtype value the Engine takes (checked here so the message names the flag)."""
    if text.lower() not in DTYPE_NAMES:
        raise argparse.ArgumentTypeError(f"must be auto, float32, bfloat16 or float16, got {text!r}")
    return text.lower()


dtype_name.__name__ = "dtype"


def device_name(text: str) -> str:
    """cpu, cuda or cuda:N; whether that GPU exists is checked when the Engine is built."""
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda") or (index and not (kind == "cuda" and index.isdigit())):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")
    return text


device_name.__name__ = "device"


# The Engine's errors suggest its keyword arguments; on the command line the same fix is a flag.
API_HINTS_AS_FLAGS = (("pass empty='special'", "pass --empty special"),
                      ("pass errors='replace'", "pass --decode-errors replace"))


def in_flags(message: str) -> str:
    """``message`` with the Engine's keyword-argument hints said as the command's flags."""
    for api, flag in API_HINTS_AS_FLAGS:
        message = message.replace(api, flag)
    return message


def default_model_dir() -> Path:
    """The shipped model every command uses when --model is not given."""
    return Path(__file__).resolve().parent / "data" / "default_model"


def check_output_dir(path, flag: str = "--out") -> Path:
    """Create the output folder now and prove a file can be written in it, before any compute.

    Raises ValueError naming ``flag`` when the path is an existing file, cannot be created, or is not
    writable, so a long run never ends in a write error.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".rmt_fast-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{flag} {out}: cannot write there ({e.strerror or e})") from None
    return out


def run_command(args) -> int:
    """Run a parsed command: a bad input or file ends as one ``error:`` line on stderr with status 2."""
    import sys

    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of the output went away (`| head -1`): stop quietly, as Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {in_flags(str(e))}", file=sys.stderr)
        return 2
