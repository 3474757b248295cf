"""matplotlib is an optional extra (``pip install 'rmt_fast[plot]'``): plots ask for it here."""
from __future__ import annotations

MISSING = "plots need matplotlib, which is not installed: pip install 'rmt_fast[plot]', or pass --no-plot"


def require_matplotlib() -> None:
    """Fail at once, before any compute, when a plot will be asked for and cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RuntimeError(MISSING) from None


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def savefig(fig, path, **kw) -> None:
    """Write the figure atomically and close it."""
    from . import files

    plt = pyplot()
    try:
        with files.atomic_path(path) as tmp:
            fig.savefig(tmp, format=str(path).rsplit(".", 1)[-1], **kw)
    finally:
        plt.close(fig)
