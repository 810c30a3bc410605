"""PNG learning curves of a training run (``bilevel plot OUT``)."""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path


def plot_run(out: str | os.PathLike, filename: str = "curves.png") -> Path:
    """Plot ``out/log.csv``: training loss, training metric and validation metric (± 95% CI).

    Args:
        out: a run folder written by :func:`bilevel.train.fit`.
        filename: the PNG to write inside ``out``.

    Returns:
        The path of the PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    log = out / "log.csv"
    if not log.is_file():
        raise FileNotFoundError(f"{log} not found: is {out} a run folder written by `bilevel <method> train`?")
    with open(log, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{log} has no rows yet")
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    it = [int(r["iteration"]) for r in train]
    axes[0].plot(it, [float(r["loss"]) for r in train], lw=1)
    axes[0].set(xlabel="iteration", ylabel="meta-loss (train)", title="training loss")
    axes[0].set_yscale("log" if all(float(r["loss"]) > 0 for r in train) else "linear")
    axes[1].plot(it, [float(r["metric"]) for r in train], lw=1, label="train")
    if val:
        vi = [int(r["iteration"]) for r in val]
        vm = [float(r["metric"]) for r in val]
        vc = [float(r["ci95"]) if not math.isnan(float(r["ci95"])) else 0.0 for r in val]
        axes[1].errorbar(vi, vm, yerr=vc, marker="o", capsize=3, label="validation ± 95% CI")
    axes[1].set(xlabel="iteration", ylabel="metric", title="accuracy / MSE")
    axes[1].legend()
    fig.tight_layout()
    path = out / filename
    tmp = out / (filename + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


__all__ = ["plot_run"]
