"""Helpers shared by the benchmark scripts (not part of the library)."""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
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


def bilevel_step(learner: Any, workers: int) -> Callable[[Any], list[torch.Tensor]]:
    """A meta-gradient step of a bilevel learner: ``step(episodes) -> grads``.

    With ``workers`` > 1 the episodes are split over that many CPU threads
    (:class:`bilevel.parallel.TaskThreads`), each with one intra-op thread — unless the learner
    already solves the tasks as one batched problem, which then gets ``workers`` intra-op threads.
    """
    from bilevel.parallel import TaskThreads

    def step(ep: Any) -> list[torch.Tensor]:
        loss, _ = learner.meta_loss(ep)
        return list(torch.autograd.grad(loss, list(learner.parameters()), allow_unused=True))

    if workers == 1:  # the caller's thread setting
        return step
    if getattr(learner, "uses_task_batching", lambda device: False)(torch.device("cpu")):
        return with_threads(workers, step)  # one batched problem: intra-op threads beat task threads
    threads = TaskThreads(learner, workers)

    def step_threads(ep: Any) -> list[torch.Tensor]:
        torch.set_num_threads(1)
        return threads.meta_gradient(ep)[2]
    return step_threads


def tensor_peak_mb(fn: Callable[[], Any]) -> float:
    """Peak of the bytes held in PyTorch tensors while ``fn()`` runs, above those held before, in MB.

    Replays the CPU allocator's allocations and frees recorded by ``torch.profiler``
    (``profile_memory=True``) in time order, at the granularity of one operator (an operator's
    own temporary buffers, freed before it returns, are not seen). Unlike the resident set this
    is not blurred by the C allocator's caching and page granularity, so sub-megabyte working
    sets can be compared between runs. Run it separately from timings: profiling slows ``fn``.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    held = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        held += event.self_cpu_memory_usage
        peak = max(peak, held)
    return peak / 2**20


def with_threads(n: int, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run with ``torch.set_num_threads(n)`` (benchmarks interleave thread settings)."""
    def run(*args: Any) -> Any:
        torch.set_num_threads(n)
        return fn(*args)
    return run


def image_dataset(data_root: Any) -> Any:
    """The Omniglot background set under ``data_root`` (train split), else the offline glyphs."""
    from bilevel.data import load_dataset

    root = Path(data_root) if data_root is not None else None
    if root is not None and (root / "omniglot").exists():
        return load_dataset("omniglot", root, "train")
    return load_dataset("glyphs", None, "train")


def episode_threads(learner: Any, workers: int) -> int:
    """Intra-op threads one episode runs on in :func:`bilevel_step` (TaskThreads workers use 1)."""
    if workers == 1 or getattr(learner, "uses_task_batching", lambda device: False)(torch.device("cpu")):
        return workers
    return 1


def live_rel_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """``rel_err`` over the parameters whose reference gradient ``b`` is not zero to rounding
    (‖b_p‖ > 1e-10 ‖b‖). The others are Conv-4's conv biases, which BatchNorm subtracts again:
    their exact meta-gradient is 0 and their float32 one is rounding noise (up to ~1e-4 ‖b‖)."""
    total = sum(float((y.double() ** 2).sum()) for y in b) ** 0.5
    keep = [float(y.double().norm()) > 1e-10 * total for y in b]
    return rel_err([x for x, k in zip(a, keep) if k], [y for y, k in zip(b, keep) if k])


def check_float32(make: Callable[[torch.dtype], Any], ep: Any, workers: int, what: str, tol: float = 1e-4) -> str:
    """Assert that bilevel's float32 meta-gradient matches float64, before float32 is timed.

    Per episode of the meta-batch (on the intra-op threads it gets in the timed step), the
    relative error ``live_rel_err(g32, g64)``; the assertion is on their median, ≤ ``tol``.
    Per episode, because the meta-batch's gradients partly cancel (the mean is shorter than
    each), which magnifies the relative error of the mean; median, because Conv-4 is piecewise
    linear: where a max-pooling window holds values tied to within float32 rounding, float32
    and float64 may take different, equally valid, branches, and that episode's error jumps to
    ~1e-4..1e-3 (a few episodes in a hundred at 5-way 1-shot; PyTorch's channels_last CPU
    BatchNorm kernel made it nearly every episode).

    If the median exceeds ``tol``, the float64 meta-gradient's own sensitivity is measured: the
    median over episodes of its change when the parameters are perturbed by 3e-7 relative (a few
    float32 roundings; float32 Conv-4 activations carry 3e-7..1.4e-6 relative error). If that too
    exceeds ``tol`` the configuration is ill-conditioned at float32 precision — no float32
    implementation can meet ``tol`` (measured: MAML 20-way 1-shot with 5 inner steps, 2.9e-4;
    5-way 1-shot with 1 step, 2e-6) — and the summary says so with both numbers instead of
    failing. Otherwise the float32 path is inaccurate: ``AssertionError``.

    Returns:
        a one-line summary to print.
    """
    def grads(learner: Any, e: Any) -> list[torch.Tensor]:
        loss, _ = learner.meta_loss(e)
        gs = torch.autograd.grad(loss, list(learner.parameters()), allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(learner.parameters(), gs)]

    def episode(e: Any, j: int, dtype: torch.dtype) -> Any:
        return type(e)(*(t[j:j + 1].to(dtype) if t.is_floating_point() else t[j:j + 1] for t in e))

    l32, l64 = make(torch.float32), make(torch.float64)
    b = ep.support_x.shape[0]
    before = torch.get_num_threads()
    torch.set_num_threads(episode_threads(l32, workers))
    try:
        refs = [grads(l64, episode(ep, j, torch.float64)) for j in range(b)]
        errs = [live_rel_err(grads(l32, episode(ep, j, torch.float32)), refs[j]) for j in range(b)]
    finally:
        torch.set_num_threads(before)
    med = statistics.median(errs)
    summary = f"float32 vs float64: {med:.1e} (median over {b} episodes, max {max(errs):.1e})"
    if med <= tol:
        return summary
    perturbed = make(torch.float64)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.mul_(1 + 3e-7 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    sens = statistics.median(live_rel_err(grads(perturbed, episode(ep, j, torch.float64)), refs[j]) for j in range(b))
    assert sens > tol, (
        f"{what}: float32 meta-gradients are {med:.1e} (median over {b} episodes) from float64, above {tol:.0e}, "
        f"while float64 moves by only {sens:.1e} under 3e-7 relative parameter perturbations; per episode: "
        + ", ".join(f"{e:.1e}" for e in errs))
    return (f"{summary}: WARNING, above {tol:.0e}, but the configuration is ill-conditioned at float32 precision "
            f"(float64 itself moves by {sens:.1e}, median, under 3e-7 relative parameter perturbations)")


def time_against_higher(make: Callable[[torch.dtype], Any], step_higher: Callable[[Any, Any], list[torch.Tensor]],
                        ep: Any, threads: int, repeats: int, what: str) -> tuple[float, float, float, str]:
    """(bilevel s/it, higher s/it, relative error of the float64 meta-gradients, float32 check).

    Asserts first that the learner built by ``make(dtype)`` and ``step_higher(learner, ep)`` give
    the same meta-gradient in float64 (relative error < 1e-4) and that bilevel's float32
    meta-gradient matches its float64 one (:func:`check_float32`), then times both in float32,
    interleaved.
    """
    ep64 = type(ep)(*(t.double() if t.is_floating_point() else t for t in ep))
    err = rel_err(bilevel_step(make(torch.float64), threads)(ep64), step_higher(make(torch.float64), ep64))
    assert err < 1e-4, f"{what}: bilevel and higher meta-gradients differ (relative error {err:.2e})"
    f32 = check_float32(make, ep, threads, what)
    learner = make(torch.float32)
    ours, peer = bilevel_step(learner, threads), with_threads(threads, step_higher)
    med = interleaved_medians({"bilevel": lambda: ours(ep), "higher": lambda: peer(learner, ep)}, repeats)
    return med["bilevel"], med["higher"], err, f32


DATA_ROOT = str(Path(__file__).resolve().parents[2] / "shared" / "data")


def add_run_options(ap: argparse.ArgumentParser, *, threads: int = 2, repeats: int | None = 7) -> None:
    """The options every comparison shares: ``--threads``, ``--repeats`` (if timed) and ``--data-root``."""
    if repeats is not None:
        ap.add_argument("--repeats", type=int, default=repeats, help="timed repetitions (median reported)")
    ap.add_argument("--threads", type=int, default=threads)
    ap.add_argument("--data-root", default=DATA_ROOT, help="folder holding omniglot/ (else the offline glyphs)")

