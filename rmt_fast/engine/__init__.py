"""The fast inference path: plan (weights laid out for speed), schedule (slots), runner (the loop)."""
from .runner import Engine, resolve_device, resolve_dtype

__all__ = ["Engine", "resolve_device", "resolve_dtype"]
