"""The fast inference path: plan (weights laid out for speed), feeder (host side, ahead), graphs, runner (the loop)."""
from .options import RunOptions
from .runner import Engine, resolve_device, resolve_dtype

__all__ = ["Engine", "RunOptions", "resolve_device", "resolve_dtype"]
