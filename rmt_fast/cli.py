"""The command line: ``rmt-fast COMMAND`` (or ``python -m rmt_fast COMMAND``).

Each command lives in the module that does its work and adds itself through ``add_cli(subparsers)``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .cli_args import run_command

COMMAND_MODULES = ["rmt_fast.classify_cli", "rmt_fast.demo", "rmt_fast.bench", "rmt_fast.train", "rmt_fast.evaluate",
                   "rmt_fast.analysis.flops", "rmt_fast.analysis.attention_maps_cli", "rmt_fast.perfmodel",
                   "rmt_fast.memory_cli"]


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
        for dtype in (torch.bfloat16, torch.float32):
            try:
                status = check_quantize('int8', torch.device(dev), dtype)
                print(f"int8 linear {dev}/{str(dtype).replace('torch.', '')}: yes, {status}")
            except ValueError as e:
                print(f"int8 linear {dev}/{str(dtype).replace('torch.', '')}: no ({e})")
                break
    from . import envvars
    # what dtype="auto" and attention="auto" pick on each device, and why
    print("\n".join(line for dev in devices for line in backends.describe_auto(torch.device(dev))))
    print("environment (build, debug and test switches only):")
    print(envvars.describe())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rmt-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_info(sub)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_cli(sub)
    return parser


def main(argv=None) -> int:
    """Parse and run one command; errors end as one line on stderr (see ``cli_args.run_command``)."""
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
