"""The meta-gradient of a meta-batch, split over CPU threads (:class:`TaskThreads`) and ranks (:func:`meta_gradient`).

On a multi-core CPU, the kernels of one small episode (a few dozen 28×28 images) parallelise
poorly across cores, while the episodes of a meta-batch are independent. ``TaskThreads`` runs
the episodes of a meta-batch on W Python threads (PyTorch releases the GIL inside its kernels),
each with a private replica of the learner — ``torch.func.functional_call`` temporarily swaps a
module's attributes, so one module must never be used by two threads at once — and sums the
replicas' gradients. The result equals the meta-gradient of the whole meta-batch (up to
floating-point summation order), so it composes with every hypergradient strategy.
"""
from __future__ import annotations

import contextvars
import copy
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import math

import torch
from torch import Tensor

from bilevel._engine import NonFiniteError
from bilevel.data.sampler import Episodes
from bilevel.distributed import average_gradients
from bilevel.learner import MetaLearner


class TaskThreads:
    """Compute ``∇ meta_loss`` of a meta-batch with W threads, one learner replica each.

    Invariant: :meth:`meta_gradient` returns (loss, metric [B], grads) with loss = 1/B Σ_j E_j
    and grads = ∇_θ loss for the parameters θ of ``learner``, as ``learner.meta_loss`` on the
    whole meta-batch followed by one backward pass would.

    Args:
        learner: the meta-learner whose parameters are differentiated (replicas are refreshed
            from it at every call).
        workers: number of threads W ≥ 1 (W = 1 runs in the calling thread).
        micro_batch: episodes per backward pass inside a worker. Smaller micro-batches hold
            fewer episodes' graphs at once (peak memory ∝ W · micro_batch episodes instead of
            the whole meta-batch). ``None`` (default): 1 when the learner loops over its tasks
            anyway (``learner.uses_task_batching(device)`` is false), else the worker's whole
            share, so that learners which batch their tasks keep doing so.
    """

    def __init__(self, learner: MetaLearner, workers: int, *, micro_batch: int | None = None) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
        if micro_batch is not None and (isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1):
            raise ValueError(f"micro_batch must be an integer >= 1 or None, got {micro_batch!r}")
        self.learner = learner
        self.workers = workers
        self.micro_batch = micro_batch
        self.replicas = [learner] + [copy.deepcopy(learner) for _ in range(workers - 1)]
        self.pool = ThreadPoolExecutor(workers) if workers > 1 else None

    def _refresh(self) -> None:
        with torch.no_grad():
            src = list(self.learner.parameters())
            for replica in self.replicas[1:]:
                replica.train(self.learner.training)
                for p, q in zip(replica.parameters(), src):
                    p.copy_(q)

    def meta_gradient(self, episodes: Episodes, *, train: bool = True) -> tuple[Tensor, Tensor, list[Tensor | None]]:
        """(meta-loss, per-episode metric [B], gradients w.r.t. ``learner.parameters()``)."""
        b = episodes.batch_size
        if self.pool is None or b < 2:
            loss, metric = self.learner.meta_loss(episodes, train=train)
            grads = torch.autograd.grad(loss, list(self.learner.parameters()), allow_unused=True)
            return loss.detach(), metric.detach(), list(grads)
        self._refresh()
        w = min(self.workers, b)
        bounds = [round(i * b / w) for i in range(w + 1)]
        chunks = [Episodes(*(t[bounds[i]:bounds[i + 1]] for t in episodes)) for i in range(w)]

        micro = self._micro_batch(episodes.support_x.device)

        def run(i: int) -> Any:
            replica = self.replicas[i]
            params = list(replica.parameters())
            n = bounds[i + 1] - bounds[i]
            step = n if micro is None else micro
            total_loss, metrics, total = None, [], None
            for lo in range(0, n, step):
                part = Episodes(*(t[lo:lo + step] for t in chunks[i]))
                loss, metric = replica.meta_loss(part, train=train)
                loss = loss * (part.batch_size / b)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                total = list(grads) if total is None else [
                    g if a is None else a if g is None else a + g for a, g in zip(total, grads)]
                total_loss = loss.detach() if total_loss is None else total_loss + loss.detach()
                metrics.append(metric.detach())
            return total_loss, torch.cat(metrics), total

        ctx = contextvars.copy_context()  # each worker runs in a copy: solve-info collectors see its solves
        results = list(self.pool.map(lambda i: ctx.copy().run(run, i), range(w)))
        grads: list[Tensor | None] = []
        for parts in zip(*(r[2] for r in results)):
            present = [g for g in parts if g is not None]
            grads.append(torch.stack(present).sum(0) if present else None)
        loss = torch.stack([r[0] for r in results]).sum()
        metric = torch.cat([r[1] for r in results])
        return loss, metric, grads

    def _micro_batch(self, device: torch.device) -> int | None:
        if self.micro_batch is not None:
            return self.micro_batch
        batches = getattr(self.learner, "uses_task_batching", None)
        return 1 if batches is not None and not batches(device) else None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()




def meta_gradient(learner: MetaLearner, episodes: Any, params: list[Tensor], threads: TaskThreads | None = None) -> Tensor:
    """Set ``p.grad`` to the meta-gradient of the whole meta-batch, averaged over the ranks.

    Invariant: with this rank's B/W episodes, ``p.grad = 1/W Σ_r ∇_p meta_loss_r`` =
    ∇_p (1/B Σ_j E_j), the gradient one process computes on all B episodes (Franceschi et al.
    2018, eq. (3.1)); the average is taken after the outer backward, so any hypergradient
    strategy composes with it (:func:`bilevel.distributed.average_gradients`). An inner loss
    that is not finite on one rank makes the averaged meta-loss infinite on every rank (all
    ranks then stop together).

    Args:
        learner: the meta-learner; ``learner.meta_loss(episodes, train=True)``.
        episodes: this rank's share of the meta-batch.
        params: the outer parameters (same order on every rank); their ``.grad`` is replaced.
        threads: run this rank's episodes on several CPU threads (:class:`bilevel.parallel.TaskThreads`).

    Returns:
        float64 [2]: the meta-loss and the metric, averaged over the whole meta-batch.
    """
    for p in params:
        p.grad = None
    try:
        if threads is not None and threads.workers > 1:
            loss, metric, grads = threads.meta_gradient(episodes, train=True)
            by_id = {id(p): g for p, g in zip(learner.parameters(), grads)}
            for p in params:
                p.grad = by_id.get(id(p))
        else:
            loss, metric = learner.meta_loss(episodes, train=True)
            loss.backward()
        stats = torch.stack([loss.detach().double(), metric.detach().double().mean()])
    except NonFiniteError:
        for p in params:
            p.grad = None
        stats = torch.tensor([math.inf, math.nan], dtype=torch.float64)
    averaged = average_gradients(params, stats)
    assert averaged is not None
    return averaged


__all__ = ["TaskThreads", "meta_gradient"]
