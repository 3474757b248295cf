"""The fast inference path: plan (weights laid out for speed), feeder (host side, ahead), graphs, runner (the loop)."""
from .runner import Engine, resolve_device, resolve_dtype

__all__ = ["Engine", "resolve_device", "resolve_dtype"]
