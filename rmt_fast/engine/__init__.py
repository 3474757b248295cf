"""The fast inference path: plan (weights laid out for speed), feeder (host side, ahead), graphs, runner (the loop)."""
from .options import RunOptions
from .device_policy import resolve_device, resolve_dtype
from .runner import Engine

__all__ = ["Engine", "RunOptions", "resolve_device", "resolve_dtype"]
