"""Training curves as a PNG: people compare runs by looking, not by reading JSON."""

from __future__ import annotations

import io
from pathlib import Path

from fedlite.atomic import atomic_write_bytes


def pyplot():
    """matplotlib's pyplot on the file-only backend: servers and CI have no screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig, dpi: int = 110) -> bytes:
    """The figure as PNG bytes; the figure is closed, so long runs do not pile them up."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    pyplot().close(fig)
    return buffer.getvalue()


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Rendered in memory, then written atomically: a failed save never replaces a good one."""
    path = Path(path)
    atomic_write_bytes(path, png_bytes(fig, dpi))
    return path


def plot_history(history: list[dict], path: Path, x_key: str = "epoch", title: str = "") -> Path:
    plt = pyplot()

    xs = [h[x_key] for h in history]
    fig, (ax_loss, ax_metrics) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(xs, [h["train_loss"] for h in history], marker="o", label="train loss")
    ax_loss.set_xlabel(x_key)
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    for key, label in (("accuracy", "accuracy"), ("auc", "AUC-ROC"), ("stage_macro_f1", "stage macro-F1")):
        values = [h.get("eval", {}).get(key) for h in history]
        if any(v is not None for v in values):
            ax_metrics.plot(xs, values, marker="o", label=label)
    ax_metrics.set_xlabel(x_key)
    ax_metrics.set_ylim(0, 1.02)
    ax_metrics.legend(loc="lower right")
    ax_metrics.set_title("held-out evaluation")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)
