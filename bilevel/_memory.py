"""How much memory Forward() will need, and how much there is (internal).

:class:`bilevel.hypergrad.Forward` carries Z_t = d s_t / dλ, one tangent of the dynamics state per
differentiated entry: m × |s| numbers, independent of T but quadratic when the hyperparameters are
as many as the parameters (params0 requiring grad: MAML-style initialisations). It checks this
estimate against a cap before the first step instead of letting the process be killed.
"""
from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch
from torch import Tensor

from bilevel import _tree as T


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
        return None if text == "max" else int(text)
    except (OSError, ValueError):
        return None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _limits() -> list[tuple[int, str]]:
    """Room left under this process's own limits: cgroup (v2, v1) memory limit and RLIMIT_AS."""
    out = []
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 2**60:
            out.append((max(limit - usage, 0), f"cgroup limit {limit_file}"))
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            with open("/proc/self/status") as f:
                vm = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:")), 0)
            out.append((max(soft - vm, 0), "RLIMIT_AS (ulimit -v)"))
    except (ImportError, OSError, ValueError):
        pass
    return out


def available_memory(device: torch.device) -> tuple[int | None, str]:
    """Bytes available for new tensors on ``device`` and where the number comes from.

    CPU: ``MemAvailable`` of ``/proc/meminfo`` (Linux), else free physical pages from
    ``os.sysconf``, lowered to the room left under a cgroup memory limit or ``RLIMIT_AS`` when
    one is set; CUDA: ``torch.cuda.mem_get_info`` plus memory cached by torch but unused. ``None``
    when it cannot be known (then no cap applies).
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached), "free CUDA memory"
    if device.type != "cpu":
        return None, f"unknown on device type {device.type!r}"
    candidates = []
    avail = _meminfo_available()
    if avail is not None:
        candidates.append((avail, "MemAvailable in /proc/meminfo"))
    else:
        try:
            candidates.append((int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")), "free physical pages (os.sysconf)"))
        except (AttributeError, ValueError, OSError):
            pass
    candidates += _limits()
    if not candidates:
        return None, "unknown (neither /proc/meminfo nor os.sysconf)"
    return min(candidates)


def activation_bytes(inner_loss: Any, params: dict[str, Tensor], hparams: dict[str, Tensor], batch: Any) -> int:
    """Bytes of the tensors that autograd saves, in one evaluation of the inner loss, that depend on w.

    Under ``jvp``, each of them carries a tangent per direction (and the backward pass inside
    the inner gradient creates as many again), so this is the per-direction working set of
    Forward's vmapped step. Saved tensors that do not depend on w (the data) and w itself are not
    counted (w's tangents are counted with the state). Returns 0 if the loss cannot be probed
    this way (e.g. saved-tensor hooks unsupported by an operation).
    """
    w = T.detach_requires_grad(params)
    w_ptrs = {v.data_ptr() for v in w.values()}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    total = 0

    def pack(x: Tensor) -> Tensor:
        nonlocal total
        try:
            if x.requires_grad and x.data_ptr() not in w_ptrs:
                key = (x.data_ptr(), tuple(x.shape))
                if key not in seen:
                    seen.add(key)
                    total += x.numel() * x.element_size()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without storage (e.g. under vmap)
            pass
        return x

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        inner_loss(w, hparams, batch)
    return total


def nbytes(tree: Any) -> int:
    """Bytes of the floating-point tensors in a pytree."""
    leaves, _ = T.tree_flatten(tree)
    return sum(x.numel() * x.element_size() for x in leaves if isinstance(x, Tensor) and x.is_floating_point())


class ForwardMemory(NamedTuple):
    """Forward()'s memory estimate, in bytes.

    Attributes:
        m: number of differentiated entries (tangent directions).
        state_bytes: one copy of the dynamics state s.
        seeds: the one-hot input tangents (m × |λ| and, on a fresh run, m × |w_0|).
        per_direction: vmap working set per direction in one step (activation tangents, twice
            for the forward and backward passes of the inner gradient, plus one gradient).
        chunk: directions per vmap call (``chunk_size`` or m).
    """

    m: int
    state_bytes: int
    seeds: int
    per_direction: int
    chunk: int

    @property
    def tangents(self) -> int:
        """One copy of the carried tangents Z_t: m × |s|."""
        return self.m * self.state_bytes

    def total(self, chunk: int | None = None) -> int:
        """Peak estimate: seeds + Z_{t−1} and Z_t + one chunk's output and working set."""
        c = self.chunk if chunk is None else chunk
        staging = c * self.state_bytes if c < self.m else 0
        return self.seeds + 2 * self.tangents + staging + c * self.per_direction

    def best_chunk(self, cap: int) -> int | None:
        """The largest chunk size whose estimate fits under ``cap`` (None if not even 1 fits)."""
        fixed = self.seeds + 2 * self.tangents
        per = self.state_bytes + self.per_direction
        if fixed + per > cap:
            return None
        return max(1, min(self.m, (cap - fixed) // max(per, 1)))


def fmt_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"  # pragma: no cover


__all__ = ["ForwardMemory", "activation_bytes", "available_memory", "fmt_bytes", "nbytes"]
