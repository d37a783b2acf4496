"""PNG plots of a run: loss and accuracy curves, confusion matrix (matplotlib, optional)."""
from __future__ import annotations

from pathlib import Path


def plot_run(history: list[dict], confusion: list[list[int]], classes: list[str],
             out: Path) -> list[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    ep = [h["epoch"] for h in history]
    ev = [h for h in history if h["val_acc"] is not None]  # epochs with a test evaluation
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    a.plot([h["epoch"] for h in ev], [h["val_loss"] for h in ev], "o-", label="test")
    a.set(xlabel="epoch", ylabel="loss", title="loss")
    b.plot(ep, [100 * h["train_acc"] for h in history], "o-", label="train")
    b.plot([h["epoch"] for h in ev], [100 * h["val_acc"] for h in ev], "o-", label="test")
    b.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="accuracy")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    curves = out / "curves.png"
    fig.savefig(curves, dpi=110)
    plt.close(fig)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * n, 1 + 0.55 * n))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix (test)")
    top = max(max(r) for r in confusion) or 1
    for i in range(n):
        for j in range(n):
            ax.text(j, i, confusion[i][j], ha="center", va="center", fontsize=7,
                    color="white" if confusion[i][j] > top / 2 else "black")
    fig.tight_layout()
    cm = out / "confusion.png"
    fig.savefig(cm, dpi=110)
    plt.close(fig)
    return [curves, cm]
