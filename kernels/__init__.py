"""Triton kernels for rmt_fast, installed as ``rmt_fast.kernels`` (see docs/KERNELS.md).

``rmt_fast.kernels.attention``: fused attention over the memory-plus-segment block. Importing this
package imports nothing else, so it never needs triton or a GPU.
"""
if __name__ == "kernels":
    # Imported by its folder's name: the repository root is on sys.path (python -m ... run from the root),
    # where this folder shadows Hugging Face's `kernels` distribution, which transformers >= 5.25 imports
    # when it is installed. The name is theirs: hand it over (this package is rmt_fast.kernels).
    import importlib as _importlib
    import os as _os
    import sys as _sys

    # Without another one, this module stays (empty, no __version__: transformers <= 5.24 imports the name
    # to probe it and then finds no usable version).
    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _saved, _self = _sys.path[:], _sys.modules[__name__]
    _sys.path[:] = [p for p in _saved if _os.path.abspath(p or _os.curdir) != _root]
    del _sys.modules[__name__]
    try:
        _sys.modules[__name__] = _importlib.import_module(__name__)
    except ImportError:
        _sys.modules[__name__] = _self
    finally:
        _sys.path[:] = _saved
