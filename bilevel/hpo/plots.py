"""PNG plots of hyper-optimisation runs (matplotlib, Agg backend, imported lazily)."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bilevel._atomic import atomic_write


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as a PNG atomically (:func:`bilevel._atomic.atomic_write`) and close it."""
    fig.tight_layout()
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        _pyplot().close(fig)


def plot_history(
    history: Sequence[Mapping[str, float]],
    path: str | Path,
    panels: Sequence[tuple[str, Sequence[str]]],
    *,
    title: str = "",
    log_y: Sequence[str] = (),
) -> Path:
    """One panel per ``(ylabel, keys)``: each key of the logged rows against the hyper-step.

    Args:
        history: rows returned by :func:`bilevel.hpo.hyper_loop` (each has ``"step"``).
        path: the PNG to write.
        panels: e.g. ``[("learning rate", ["lr"]), ("loss", ["val_loss"])]``.
        title: figure title.
        log_y: panel labels whose y axis is logarithmic.

    Returns:
        ``path``.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    steps = [r["step"] for r in history]
    for ax, (label, keys) in zip(axes[0], panels):
        for k in [k for k in keys if history and k in history[0]]:
            ax.plot(steps, [r[k] for r in history], label=k)
        ax.set_xlabel("hyper-step")
        ax.set_ylabel(label)
        if label in log_y:
            ax.set_yscale("log")
        if len(keys) > 1:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_schedule(values: Tensor, path: str | Path, *, initial: float | None = None, ylabel: str = "learning rate") -> Path:
    """The tuned per-step schedule η_t against the inner step t (with the initial constant)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    v = values.detach().cpu().reshape(-1)
    ax.plot(range(1, len(v) + 1), v.tolist(), label="tuned")
    if initial is not None:
        ax.axhline(initial, color="gray", ls="--", label="initial")
    ax.set_xlabel("inner step t")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_weight_histogram(weights: Tensor, corrupted: Tensor, path: str | Path, *, threshold: float | None = None) -> Path:
    """Histogram of the learned example weights in [0, 1], clean and corrupted examples apart."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    w, c = weights.detach().cpu(), corrupted.cpu()
    bins = torch.linspace(0, 1, 41).tolist()
    ax.hist(w[~c].tolist(), bins=bins, alpha=0.6, label=f"clean ({int((~c).sum())})", color="tab:blue")
    ax.hist(w[c].tolist(), bins=bins, alpha=0.6, label=f"corrupted ({int(c.sum())})", color="tab:red")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", lw=1, label=f"flag below {threshold:g}")
    ax.set_xlabel("learned weight of the training example")
    ax.set_ylabel("examples")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_l2(
    grid: Sequence[Mapping[str, float]],
    tuned: Mapping[str, float],
    log10_l2: Tensor,
    history: Sequence[Mapping[str, float]],
    path: str | Path,
) -> Path:
    """Grid search over one shared L2 weight vs the tuned per-feature L2 weights.

    Panels: validation/test loss over the grid with the tuned losses as horizontal lines; the
    validation loss over hyper-steps; the learned log10 L2 weight per feature (an image when the
    number of features is a square, e.g. 28×28 pixels).
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    xs = [g["l2"] for g in grid]
    ax = axes[0]
    ax.semilogx(xs, [g["val_loss"] for g in grid], "o-", label="grid: val", color="tab:blue")
    ax.semilogx(xs, [g["test_loss"] for g in grid], "s-", label="grid: test", color="tab:orange")
    ax.axhline(tuned["val_loss"], color="tab:blue", ls="--", label="per-feature: val")
    ax.axhline(tuned["test_loss"], color="tab:orange", ls="--", label="per-feature: test")
    ax.set_xlabel("shared L2 weight")
    ax.set_ylabel("cross-entropy")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[1]
    ax.plot([r["step"] for r in history], [r["val_loss"] for r in history])
    ax.set_xlabel("hyper-step")
    ax.set_ylabel("validation loss (inner run)")
    ax.grid(alpha=0.3)
    ax = axes[2]
    v = log10_l2.detach().cpu().reshape(-1)
    side = math.isqrt(len(v))
    if side * side == len(v):
        im = ax.imshow(v.reshape(side, side).tolist(), cmap="viridis")
        fig.colorbar(im, ax=ax, label="log10 L2 weight")
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        ax.plot(v.tolist(), ".")
        ax.set_xlabel("feature")
        ax.set_ylabel("log10 L2 weight")
    ax.set_title("learned per-feature L2")
    return _save(fig, path)


__all__ = ["plot_history", "plot_l2", "plot_schedule", "plot_weight_histogram"]
