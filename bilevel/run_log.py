"""The training log of a run: ``log.csv`` (and TensorBoard events under ``tb/``), written by rank 0.

Resuming keeps the rows up to the checkpoint's iteration and drops the rest (and TensorBoard's
events after it), so a resumed run's log equals an uninterrupted run's. Rows that cannot be
parsed (a torn line after a crash) are dropped with a warning naming the file and line.
"""
from __future__ import annotations

import csv
import io
import math
import shutil
import warnings
from pathlib import Path
from typing import Any

from bilevel._atomic import atomic_write_text

__all__ = ["LOG", "LOG_FIELDS", "RunLog", "replay_warnings"]

LOG = "log.csv"
#: optimality / linear_residual: the worst certificates of implicit hypergradients since the previous row
#: (empty for strategies that measure none; see bilevel.Implicit)
LOG_FIELDS = ["iteration", "split", "loss", "metric", "ci95", "lr", "seconds", "optimality", "linear_residual"]


def _kept_rows(path: Path, resume_from: int) -> list[dict[str, str]]:
    rows = []
    with open(path, newline="", errors="replace") as f:
        for line_no, row in enumerate(csv.DictReader(f), start=2):
            try:
                it = int(row["iteration"])
            except (KeyError, TypeError, ValueError):
                warnings.warn(f"{path}: dropping unreadable line {line_no} ({str(row.get('iteration'))[:30]!r})", stacklevel=4)
                continue
            if it <= resume_from:
                rows.append({k: row.get(k, "") for k in LOG_FIELDS})
    return rows


class RunLog:
    """CSV (+ TensorBoard) log of a run (see the module docstring).

    Args:
        out: the run folder.
        enabled: False on ranks other than 0 (they log nothing).
        tensorboard: also write TensorBoard events under ``out/tb``.
        resume_from: the checkpoint's iteration when resuming, else ``None`` (a fresh log; stale
            TensorBoard events of an earlier attempt are removed).
    """

    def __init__(self, out: Path, enabled: bool, tensorboard: bool, resume_from: int | None) -> None:
        self.enabled = enabled
        self.path = out / LOG
        self.tb = None
        if not enabled:
            return
        rows = _kept_rows(self.path, resume_from) if resume_from is not None and self.path.exists() else []
        buf = io.StringIO()
        w = csv.DictWriter(buf, LOG_FIELDS)
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(self.path, buf.getvalue())
        self.file = open(self.path, "a", newline="")
        self.writer = csv.DictWriter(self.file, LOG_FIELDS)
        if tensorboard:
            if resume_from is None and (out / "tb").exists():
                shutil.rmtree(out / "tb")
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("tensorboard is not installed: logging to CSV only (pip install tensorboard)", stacklevel=3)
            else:
                self.tb = SummaryWriter(str(out / "tb"), purge_step=resume_from + 1 if resume_from is not None else None)

    def log(self, iteration: int, split: str, *, loss: float = math.nan, metric: float = math.nan,
            ci95: float = math.nan, lr: float = math.nan, seconds: float = math.nan, optimality: float = math.nan,
            linear_residual: float = math.nan) -> None:
        """One row (NaN residuals, i.e. not measured, are written as empty cells)."""
        if not self.enabled:
            return
        cell = lambda x: "" if math.isnan(x) else f"{x:.3g}"  # noqa: E731
        self.writer.writerow({"iteration": iteration, "split": split, "loss": f"{loss:.6g}", "metric": f"{metric:.6g}",
                              "ci95": f"{ci95:.6g}", "lr": f"{lr:.6g}", "seconds": f"{seconds:.3f}",
                              "optimality": cell(optimality), "linear_residual": cell(linear_residual)})
        self.file.flush()
        if self.tb is not None:
            if not math.isnan(loss):
                self.tb.add_scalar(f"{split}/loss", loss, iteration)
            self.tb.add_scalar(f"{split}/metric", metric, iteration)
            self.tb.add_scalar("lr", lr, iteration)
            for k, v in (("optimality", optimality), ("linear_residual", linear_residual)):
                if not math.isnan(v):
                    self.tb.add_scalar(f"{split}/implicit_{k}", v, iteration)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def replay_warnings(caught: list[warnings.WarningMessage], seen: frozenset[tuple[Any, ...]], iteration: int
                    ) -> frozenset[tuple[Any, ...]]:
    """Re-emit the warnings one training iteration recorded, each kind once per run.

    A kind is (category, file, line) — the same warning about another task or iteration differs
    only in its numbers, and the residuals of every logged iteration are in ``log.csv``. ``seen``
    holds the kinds shown so far in the run; the updated set is returned.
    """
    for w in caught:
        key = (w.category, w.filename, w.lineno)
        if key in seen:
            continue
        seen = seen | {key}
        warnings.warn(f"meta-iteration {iteration}: {w.message} (each kind of warning is shown once per run; log.csv "
                      "records the worst implicit residuals of every logged iteration)", w.category, stacklevel=3)
    return seen
