"""Data-parallel meta-training: process groups, averaged meta-gradients, rank-0 I/O, launching.

The meta-batch of episodes is data-parallel: W processes (ranks) each adapt B/W episodes of
the same meta-batch and the meta-gradients are averaged, so that

    1/W Σ_r ∇_λ (W/B Σ_{j ∈ share_r} E_j(λ)) = ∇_λ (1/B Σ_j E_j(λ)),

i.e. W ranks take exactly the outer step of one process on the whole meta-batch (up to the
floating-point summation order). This holds whatever computed the per-rank meta-gradient
(unrolled second-order reverse mode, truncation, implicit differentiation with CG, a QP layer),
because the average is taken *after* the outer ``loss.backward()``, on the finished ``.grad``
of each outer parameter (:func:`average_gradients`), with one all-reduce of a flat buffer.

Why not ``DistributedDataParallel``: DDP all-reduces from autograd hooks while the backward
runs and assumes one forward through the DDP wrapper per backward, over the registered
parameters. Meta-learners call the network many times per outer step through
``torch.func.functional_call`` with adapted (non-leaf) weights, differentiate inner losses
with ``torch.autograd.grad(create_graph=True)`` (which DDP does not support: "This module
doesn't work with torch.autograd.grad()", DDP docs) and implicit hypergradients run extra
vector-Jacobian products through custom backward passes. DDP's gain, overlapping the
all-reduce with the backward, is small here: the meta-gradient of a Conv-4 is 0.45 MB, while
the backward through the inner loops dominates.

Launching: ``torchrun --nproc-per-node N -m bilevel.cli <method> train …`` (any number of
nodes) or ``bilevel <method> train --nproc N`` (one node, :func:`launch`, torch's elastic
launcher, the engine of torchrun). :func:`init_from_env` (called by :func:`bilevel.train.fit`)
creates the process group from torchrun's environment: gloo on CPU, NCCL on GPU, rank r on
``cuda:LOCAL_RANK``.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "RankError",
    "average_gradients",
    "broadcast_module",
    "broadcast_object",
    "init_from_env",
    "launch",
    "leave_group",
    "on_rank0",
    "under_launcher",
    "world",
    "world_size_mismatch",
]


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def under_launcher() -> bool:
    """Whether this process was started by torchrun / the elastic launcher (``WORLD_SIZE`` set)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_from_env(device: str | torch.device) -> tuple[torch.device, bool]:
    """Create the default process group from torchrun's environment when there are >1 ranks.

    Backend: ``nccl`` for CUDA devices, ``gloo`` otherwise; rendezvous through ``env://``
    (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE`` set by torchrun, on one node or
    several). A device ``"cuda"`` without index becomes ``cuda:LOCAL_RANK`` (and is made the
    current CUDA device). An already initialised process group is used as it is.

    Args:
        device: the requested device (``"cpu"``, ``"cuda"``, ``"cuda:1"``, …).

    Returns:
        ``(device, owned)``: the device of this rank, and whether this call created the
        process group (the caller then destroys it with ``dist.destroy_process_group()``).

    Raises:
        ValueError: a CUDA device with an explicit index while several ranks share the node
            (they would all use the same GPU), or a LOCAL_RANK without a GPU.
    """
    dev = torch.device(device)
    initialised = dist.is_available() and dist.is_initialized()
    size = dist.get_world_size() if initialised else int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 and not initialised:
        return dev, False
    if dev.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if dev.index is None:
            if local_rank >= torch.cuda.device_count():
                raise ValueError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) "
                                 "are visible; start at most that many processes per node")
            dev = torch.device("cuda", local_rank)
        elif local_size > 1:
            raise ValueError(f"device {str(device)!r} would put all {local_size} processes of this node on the same "
                             "GPU; pass --device cuda so that local rank r uses cuda:r")
        torch.cuda.set_device(dev)
    if initialised:
        return dev, False
    if not dist.is_available():  # pragma: no cover - torch built without distributed
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    device_id = dev if dev.type == "cuda" else None
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # Workers restarted by torchrun (--max-restarts) reuse the agent's store, which still holds the
        # previous attempt's connection keys (gloo then fails with "Connection refused"): use fresh keys.
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size, is_master=False,
                              timeout=timedelta(minutes=30))
        dist.init_process_group(backend, store=dist.PrefixStore(f"bilevel/attempt_{restart}", store),
                                rank=int(os.environ["RANK"]), world_size=size, device_id=device_id)
    else:
        dist.init_process_group(backend, device_id=device_id)
    return dev, True


def leave_group(*, synchronize: bool) -> None:
    """Destroy the default process group, after a barrier when ``synchronize``.

    Pass ``synchronize=True`` when every rank got here normally: no rank then tears its
    connections down while a peer still uses the group (rank 0 writing its last files, say).
    With gloo, a process that exits in that window can abort at interpreter exit ("terminate
    called without an active exception", SIGABRT), which the launcher reports as a failed run.
    On an error path pass ``False``: the peers may never reach the barrier.
    """
    if synchronize:
        dist.barrier()
    dist.destroy_process_group()


def average_gradients(params: Sequence[Tensor], stats: Tensor | None = None) -> Tensor | None:
    """Replace every ``p.grad`` by its mean over the ranks (no-op with one process).

    Invariant: after the call every rank holds the same ``p.grad = 1/W Σ_r p.grad_r``, where
    a missing gradient counts as zero, and ``p.grad`` stays ``None`` only if it is ``None`` on
    every rank (so that the optimizer skips exactly the parameters one process would skip).
    Gradients are flattened into one buffer per (dtype, device): one all-reduce each, plus one
    for the float64 bookkeeping (``stats`` and the has-gradient flags); all are issued
    asynchronously and awaited together.

    Args:
        params: the outer parameters, in the same order on every rank.
        stats: optional float64 vector [S] of per-rank means (e.g. loss, metric) to average.

    Returns:
        ``stats`` averaged over the ranks (``stats`` itself with one process).

    Raises:
        TypeError: a sparse gradient.
    """
    _, size = world()
    if size == 1:
        return stats
    flags = torch.tensor([p.grad is not None for p in params], dtype=torch.float64)
    extra = torch.cat([stats.detach().double().reshape(-1).cpu() if stats is not None else flags[:0], flags])
    device = params[0].device if params else torch.device("cpu")
    extra = extra.to(device if dist.get_backend() == "nccl" else "cpu")
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, p in enumerate(params):
        if p.grad is not None and p.grad.is_sparse:
            raise TypeError(f"parameter {i} has a sparse gradient; data-parallel averaging needs dense gradients")
        groups.setdefault((p.dtype, p.device), []).append(i)
    def flat_grad(p: Tensor) -> Tensor:
        return (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)

    buffers = {key: torch.cat([flat_grad(params[i]) for i in idx]) for key, idx in groups.items()}
    works = [dist.all_reduce(t, async_op=True) for t in (extra, *buffers.values())]
    for w in works:
        w.wait()
    extra = extra.cpu() / size
    has_grad = extra[extra.numel() - len(params):] > 0
    for key, idx in groups.items():
        flat = buffers[key].div_(size)
        offset = 0
        for i in idx:
            p = params[i]
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p) if bool(has_grad[i]) else None
            offset += n
    return extra[:extra.numel() - len(params)] if stats is not None else None


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled; identity with one process)."""
    rank, size = world()
    if size == 1:
        return obj
    box = [obj if rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy the parameters and buffers of rank ``src`` into ``module`` on every rank, in place.

    The ranks build their learners from the same seed; this makes them identical even if a
    factory is not deterministic (as DDP does at construction).
    """
    if world()[1] == 1:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=src)


def world_size_mismatch(out: str | os.PathLike, written_by: int, now: int) -> str:
    """The message refusing to resume a run written by ``written_by`` processes with ``now``."""
    return (f"--resume: the checkpoint in {out} was written by {written_by} process(es) but this run has {now}; "
            f"resume with the same number of processes (--nproc {written_by}, or torchrun with "
            f"{written_by} processes in all)")


def launch(fn: Callable[..., Any], args: Sequence[Any] = (), *, nproc: int, threads: int | None = None,
           log_dir: str | None = None) -> Any:
    """Run ``fn(*args)`` in ``nproc`` processes on this machine under torch's elastic launcher.

    The same machinery as ``torchrun --standalone --nproc-per-node nproc --max-restarts 0``:
    each worker gets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR/PORT`` in its
    environment (:func:`init_from_env` creates the process group), a c10d rendezvous on a free
    local port, processes started with ``spawn`` (so ``fn`` must be importable: a module-level
    function). If a worker fails or dies, the others are stopped and
    ``torch.distributed.elastic.multiprocessing.errors.ChildFailedError`` is raised (no restart:
    resuming from the last checkpoint is explicit).

    Args:
        fn: module-level function run by every rank.
        args: its positional arguments (pickled).
        nproc: number of processes (>= 1).
        threads: ``OMP_NUM_THREADS`` for the workers when the variable is not set (torchrun
            sets 1); ``None``: 1.
        log_dir: where the launcher keeps per-rank logs (default: a temporary folder).

    Returns:
        The return value of rank 0.
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be an integer >= 1, got {nproc!r}")
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
                          start_method="spawn", logs_specs=DefaultLogsSpecs(log_dir=log_dir))
    set_omp = "OMP_NUM_THREADS" not in os.environ
    if set_omp:
        os.environ["OMP_NUM_THREADS"] = str(threads or 1)
    try:
        return elastic_launch(config, fn)(*args)[0]
    finally:
        if set_omp:
            os.environ.pop("OMP_NUM_THREADS", None)


class RankError(ValueError):
    """An error rank 0 met (e.g. reading or writing the run folder), raised on every other rank too.

    Attributes:
        option: the option rank 0's error named, if any (so the CLI reports it on that option).
    """

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


def on_rank0(fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 only; if it raises, every rank raises (none is left waiting in a collective).

    Invariant: called by every rank at the same point; returns ``fn()``'s result on rank 0 and
    ``None`` elsewhere. Rank 0 re-raises its own exception; the others raise :class:`RankError`
    with the same message. With one process it is just ``fn()``.
    """
    rank, size = world()
    if size == 1:
        return fn()
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except (ValueError, OSError) as e:
            error = e
    failure = broadcast_object(None if error is None else (str(error), getattr(error, "option", None)))
    if error is not None:
        raise error
    if failure is not None:
        raise RankError(*failure)
    return result
