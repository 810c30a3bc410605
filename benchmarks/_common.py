"""Helpers shared by the benchmark scripts (not part of the library)."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def rel_err(a: list[torch.Tensor], b: list[torch.Tensor | None]) -> float:
    """‖a − b‖ / ‖b‖ over all tensors together (missing gradients count as zeros)."""
    b = [torch.zeros_like(x) if y is None else y for x, y in zip(a, b)]
    num = sum(float(((x - y).double() ** 2).sum()) for x, y in zip(a, b)) ** 0.5
    return num / sum(float((y.double() ** 2).sum()) for y in b) ** 0.5


def interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median wall time of each function, calling them in turn ``repeats`` times (drift hits all alike)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_mb(fn: Callable[[], Any]) -> float:
    """Growth of the resident set's peak while ``fn()`` runs, in MB.

    Resets the kernel's high-water mark first (``/proc/self/clear_refs`` ← 5, Linux), so the
    figure is the peak during ``fn`` above the memory held before it. (``ru_maxrss`` cannot be
    used in a child process: Linux carries the parent's peak over ``execve``.)
    """
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    return max(0, _status_kb("VmHWM") - before) / 1024.0
