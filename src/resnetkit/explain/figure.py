"""The picture of an explanation: one row per image with the image, its heatmap laid over
it, and the model's top classes with their probabilities. matplotlib draws it without
pyplot (no global figure state, no backend switch), and the PNG is written atomically."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import UserError
from ..untrusted import shown
from ..weights import atomic_write

# A figure is one row per image: past this it is too tall to look at (and to draw)
MAX_FIGURE_IMAGES = 32
# class names and titles come from files: long ones are cut so that a row stays readable
MAX_LABEL_CHARS = 40


def check_output(path: str | Path) -> Path:
    """`path` if a PNG can be written there (a .png name in an existing folder, not a
    folder itself), else UserError; an existing file is replaced atomically."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UserError(f"the figure is a PNG file: name it with .png, not {shown(path.name)}")
    if not path.parent.is_dir():
        raise UserError(f"cannot write {shown(path)}: folder {shown(path.parent)} does not exist")
    if path.is_dir():
        raise UserError(f"{shown(path)} is a folder; give a file name for the figure")
    return path


def _label(text: Any) -> str:
    text = shown(text)
    return text if len(text) <= MAX_LABEL_CHARS else text[:MAX_LABEL_CHARS - 1] + "\u2026"


def _display(images: Any) -> np.ndarray:
    """(N, C, H, W) uint8 (0..255) or float (0..1) images -> (N, H, W, C) floats in 0..1."""
    arr = images.detach().cpu() if isinstance(images, torch.Tensor) else torch.as_tensor(
        np.asarray(images))
    if arr.dim() != 4 or arr.shape[1] not in (1, 3):
        raise UserError(f"the images to show must be (N, C, H, W) with 1 or 3 channels, got "
                        f"shape {tuple(arr.shape)}")
    arr = arr.float() / 255 if arr.dtype == torch.uint8 else arr.float()
    return arr.nan_to_num(0.0).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _scaled(heat: np.ndarray) -> np.ndarray:
    """One heatmap in 0..1: by its maximum when it has no negative values (Grad-CAM, |IG|:
    zero stays "not looked at"), else by its range (signed occlusion)."""
    heat = np.nan_to_num(heat.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(heat.min()), float(heat.max())
    if low >= 0:
        return heat / high if high > 0 else heat
    return (heat - low) / (high - low)


def explain_figure(images: Any, heatmaps: Any, top3: Sequence[Sequence[tuple[str, float]]],
                   path: str | Path, titles: Sequence[str] | None = None) -> Path:
    """Write one PNG to `path`: per image a row with the image, the heatmap over it (jet
    colours, half transparent, each heatmap scaled to 0..1 on its own) and its top classes
    as "name  probability" lines.

    images: (N, C, H, W), uint8 or float in 0..1, C 1 or 3: what the model saw, for display.
    heatmaps: (N, h, w), stretched over the image. top3: per image, [(class name, prob)].
    titles: an optional line above each row (a file name). Class names and titles are
    escaped (untrusted.shown) and never read as mathtext. Returns the path. Raises
    UserError for lengths that differ, more than MAX_FIGURE_IMAGES images, a path that
    cannot take the PNG, a failed write, or matplotlib missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("the figure needs matplotlib: pip install 'resnetkit[explain]'") from None
    path = check_output(path)
    shown_images = _display(images)
    heat = (heatmaps.detach().cpu().float().numpy() if isinstance(heatmaps, torch.Tensor)
            else np.asarray(heatmaps, dtype=np.float64))
    n = len(shown_images)
    if heat.ndim != 3 or len(heat) != n or len(top3) != n or (titles is not None
                                                              and len(titles) != n):
        raise UserError(f"the figure needs one heatmap (h, w), one top-class list and one title "
                        f"per image: got {n} images, heatmaps of shape {heat.shape} and "
                        f"{len(top3)} top-class lists")
    if n > MAX_FIGURE_IMAGES:
        raise UserError(f"{n} images make too tall a figure: explain at most "
                        f"{MAX_FIGURE_IMAGES} at a time")
    fig = Figure(figsize=(9, 2.8 * n), dpi=100)
    axes = fig.subplots(n, 3, squeeze=False)
    for i, (img, (a, b, c)) in enumerate(zip(shown_images, axes)):
        h, w = img.shape[:2]
        extent = (-0.5, w - 0.5, h - 0.5, -0.5)  # the heatmap stretched over the image
        gray = img.shape[2] == 1
        for ax in (a, b):
            ax.imshow(img[..., 0] if gray else img, cmap="gray" if gray else None,
                      vmin=0, vmax=1)
            ax.set_axis_off()
        b.imshow(_scaled(heat[i]), cmap="jet", alpha=0.5, vmin=0, vmax=1, extent=extent,
                 interpolation="bilinear")
        if titles is not None:
            a.set_title(_label(titles[i]), fontsize=9, parse_math=False)
        b.set_title("heatmap", fontsize=9)
        c.set_axis_off()
        for k, (name, prob) in enumerate(top3[i]):
            c.text(0.0, 0.85 - 0.2 * k, f"{k + 1}. {_label(name)}  {float(prob):.1%}",
                   transform=c.transAxes, fontsize=10, va="top", parse_math=False)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    except OSError as e:
        raise UserError(f"cannot write {shown(path)}: {e.strerror or e}") from None
    return path
