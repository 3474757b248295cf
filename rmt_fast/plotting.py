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


def heatmaps(grid: dict, path) -> None:
    """Figure 5: a panel per task, training segments (rows) against evaluation segments (columns),
    accuracy as colour and written in each cell; cells evaluated at the training length are framed.

    grid: {task: {"train_segments": [..], "eval_segments": [..], "accuracy": [[float or None]]}}.
    """
    import numpy as np

    plt = pyplot()
    tasks = list(grid)
    width = max(len(g["eval_segments"]) for g in grid.values())
    fig, axes = plt.subplots(1, len(tasks), figsize=(0.55 * width * len(tasks) + 1.5, 0.45 *
                             max(len(g["train_segments"]) for g in grid.values()) + 1.6), squeeze=False)
    image = None
    for ax, task in zip(axes[0], tasks):
        g = grid[task]
        acc = np.array([[np.nan if a is None else 100 * a for a in row] for row in g["accuracy"]], dtype=float)
        image = ax.imshow(acc, cmap="viridis", vmin=0, vmax=100, aspect="auto", origin="lower")
        ax.set_xticks(range(len(g["eval_segments"])), [str(e) for e in g["eval_segments"]], fontsize=7)
        ax.set_yticks(range(len(g["train_segments"])), [str(t) for t in g["train_segments"]], fontsize=7)
        ax.set_xlabel("evaluated at, segments")
        ax.set_ylabel("trained on, segments")
        ax.set_title(task)
        for i, t in enumerate(g["train_segments"]):
            for j, e in enumerate(g["eval_segments"]):
                if not np.isnan(acc[i, j]):
                    ax.text(j, i, f"{acc[i, j]:.0f}", ha="center", va="center", fontsize=6,
                            color="black" if acc[i, j] > 60 else "white")
                if e == t:
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1))
    fig.colorbar(image, ax=list(axes[0]), label="accuracy, %", shrink=0.9)
    savefig(fig, path, dpi=120)
