"""Run a solver on a :class:`BenchProblem` and record its metric against time (excluding evaluation)."""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bilevel.stochastic.problems import BenchProblem

#: evaluation period (in solver steps) by solver class name: about the same oracle work between evaluations
EVAL_EVERY = {"SOBA": 64, "SABA": 64, "AmIGO": 4, "StocBiO": 4, "F2SA": 2}


@dataclass(frozen=True)
class Trace:
    """The record of one run: rows of {step, time, value, …metric keys}; ``time`` excludes evaluation."""

    solver: str
    rows: tuple[dict[str, float], ...]
    stopped: str  # "target", "time", "steps" or "diverged"

    def time_to(self, target: float) -> float:
        """First recorded time at which ``value`` ≤ target (``inf`` if never)."""
        for r in self.rows:
            if r["value"] <= target:
                return r["time"]
        return math.inf


def _sync(state: Any) -> None:
    leaves = [t for t in torch.utils._pytree.tree_leaves(state) if isinstance(t, torch.Tensor) and t.is_cuda]
    if leaves:
        torch.cuda.synchronize(leaves[0].device)


def run(
    solver: Any,
    bench: BenchProblem,
    *,
    batch_size: int | str = 64,
    max_time: float = 10.0,
    max_steps: int | None = None,
    eval_every: int | None = None,
    target: float | None = None,
    seed: int = 0,
    on_eval: Callable[[dict[str, float]], None] | None = None,
) -> Trace:
    """Run ``solver`` (init/step) on ``bench`` until the time budget, a step budget or the target.

    Invariant: the clock runs only inside ``solver.init``/``solver.step`` (device work awaited);
    evaluations of ``bench.metric`` are not timed. Evaluations happen at step 0 and every
    ``eval_every`` steps.

    Args:
        solver: a solver object (``SOBA()``, ``SABA()``, … or anything with ``init``/``step``).
        bench: the problem.
        batch_size: samples per mini-batch (or ``"full"``).
        max_time: seconds of solver time.
        max_steps: optional cap on solver steps.
        eval_every: steps between evaluations (default by solver, see ``EVAL_EVERY``).
        target: stop once ``value`` ≤ target.
        seed: batch-order seed.
        on_eval: called with each recorded row (progress bars, logs).

    Returns:
        A :class:`Trace`; a non-finite metric stops the run with ``stopped="diverged"`` and a warning.
    """
    name = type(solver).__name__
    every = eval_every or EVAL_EVERY.get(name, 16)
    inner_b, outer_b = bench.batches(batch_size)
    rows: list[dict[str, float]] = []

    def record(step: int, elapsed: float, state: Any) -> bool:
        m = bench.metric(state.inner, state.outer)
        row = {"step": float(step), "time": elapsed, **m}
        rows.append(row)
        if on_eval is not None:
            on_eval(row)
        return math.isfinite(m["value"])

    t0 = time.perf_counter()
    state = solver.init(bench.problem, bench.inner0, bench.outer0, inner_b, outer_b, seed=seed)
    _sync(state)
    elapsed = time.perf_counter() - t0
    step, stopped = 0, "time"
    if not record(0, elapsed, state):
        stopped = "diverged"
    while stopped != "diverged":
        if target is not None and rows[-1]["value"] <= target:
            stopped = "target"
            break
        if elapsed >= max_time:
            stopped = "time"
            break
        if max_steps is not None and step >= max_steps:
            stopped = "steps"
            break
        t0 = time.perf_counter()
        for _ in range(every):
            state = solver.step(state, bench.problem, inner_b, outer_b)
        _sync(state)
        elapsed += time.perf_counter() - t0
        step += every
        if not record(step, elapsed, state):
            stopped = "diverged"
    if stopped == "diverged":
        warnings.warn(f"{name} diverged on {bench.name}: the metric is not finite at step {step} "
                      f"(value={rows[-1]['value']}); lower its step size", RuntimeWarning, stacklevel=2)
    return Trace(repr(solver), tuple(rows), stopped)


__all__ = ["EVAL_EVERY", "Trace", "run"]
