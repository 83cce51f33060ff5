"""Matplotlib figures (Agg backend, PNG): training curves, precision-recall curves, and
qualitative retrieval figures (an image with its nearest captions, a caption with its nearest
images)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

TRUE_COLOUR = "#1a8a3a"
FALSE_COLOUR = "#444444"


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}")  # published whole: a reader never sees half a PNG
    from .outputs import disk_errors

    try:
        with disk_errors(path):  # a full disk names the figure (matplotlib's write error names nothing)
            fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def training_curves(results: list[dict], path: str | Path) -> Path:
    """Loss and validation R@K by epoch, from a run's ``results.jsonl`` rows."""
    ep = [r["epoch"] for r in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(ep, [r.get("loss", np.nan) for r in results], marker=".")
    ax1.set(xlabel="epoch", ylabel="training loss", title="loss")
    for d, style in (("img2text", "-"), ("text2img", "--")):
        for k, c in zip((1, 5, 10), ("C0", "C1", "C2"), strict=True):
            key = f"val_{d}_R@{k}"
            if any(key in r for r in results):
                ax2.plot(ep, [r.get(key, np.nan) for r in results], style, color=c, label=f"{d} R@{k}")
    ax2.set(xlabel="epoch", ylabel="recall (%)", title="validation R@K", ylim=(0, 100))
    ax2.legend(fontsize=7, ncol=2)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    return _save(fig, path)


def pr_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str = "") -> Path:
    """``curves``: label -> (precision (G,), recall (G,)) averaged over queries."""
    fig, ax = plt.subplots(figsize=(5, 4))
    for label, (prec, rec) in curves.items():
        ax.plot(rec, prec, label=label)
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=title or "precision-recall")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def image_to_captions(image, query_title: str, captions: list[str], scores: list[float], is_true: list[bool],
                      path: str | Path) -> Path:
    """A query image beside its k nearest captions, true ones marked in green with a tick."""
    k = len(captions)
    fig = plt.figure(figsize=(11, max(3.2, 0.62 * k + 0.8)))
    ax_img = fig.add_axes([0.01, 0.05, 0.34, 0.85])
    ax_img.imshow(image)
    ax_img.set_axis_off()
    ax_img.set_title(textwrap.fill(query_title, 48), fontsize=9)
    ax_txt = fig.add_axes([0.37, 0.02, 0.62, 0.92])
    ax_txt.set_axis_off()
    ax_txt.set_title(f"top {k} captions (cosine similarity)", fontsize=10, loc="left")
    for i, (cap, s, ok) in enumerate(zip(captions, scores, is_true, strict=True)):
        y = 1 - (i + 0.5) / k
        mark = "\u2713" if ok else " "
        ax_txt.text(0.0, y, f"{i + 1:>2}. {mark} {s:.3f}", fontsize=9, family="monospace", va="center",
                    color=TRUE_COLOUR if ok else FALSE_COLOUR, fontweight="bold" if ok else "normal")
        ax_txt.text(0.2, y, textwrap.fill(cap, 70), fontsize=9, va="center",
                    color=TRUE_COLOUR if ok else "black")
    return _save(fig, path)


def caption_to_images(query: str, images: list, titles: list[str], scores: list[float], is_true: list[bool],
                      path: str | Path, cols: int = 5) -> Path:
    """A caption (or any sentence) above a grid of its k nearest images, true ones framed green."""
    k = len(images)
    rows = (k + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows + 0.7), squeeze=False)
    fig.suptitle(textwrap.fill(f"\u201c{query}\u201d", 90), fontsize=11)
    for ax in axes.flat:
        ax.set_axis_off()
    for i, (im, t, s, ok) in enumerate(zip(images, titles, scores, is_true, strict=True)):
        ax = axes.flat[i]
        ax.imshow(im)
        ax.set_axis_on()
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor(TRUE_COLOUR if ok else "#bbbbbb")
            spine.set_linewidth(5 if ok else 1)
        tick = "  \u2713 true" if ok else ""
        ax.set_title(f"{i + 1}. {s:.3f}{tick}\n{t}", fontsize=8,
                     color=TRUE_COLOUR if ok else "black")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return _save(fig, path)
