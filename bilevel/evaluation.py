"""Few-shot evaluation: mean over test episodes with a 95% confidence interval.

As reported in the papers (e.g. MetaOptNet, Tables 1-3): ``mean +- 1.96 * std / sqrt(N)`` over
N test episodes, ``std`` being the population standard deviation (``np.std``, as the
MetaOptNet and ProtoNets evaluation code compute it).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["episode_metric", "evaluate", "mean_ci"]


def mean_ci(values: Sequence[float] | Tensor) -> tuple[float, float]:
    """Mean and half-width of the 95% confidence interval: ``1.96 * std / sqrt(N)``.

    Args:
        values: N >= 1 per-episode values (accuracies or errors).

    Returns:
        ``(mean, ci95)``; ``ci95`` is NaN for N = 1 (one episode gives no interval).
    """
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    n = v.numel()
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    if not bool(torch.isfinite(v).all()):
        bad = torch.nonzero(~torch.isfinite(v)).flatten()[:5].tolist()
        raise ValueError(f"mean_ci got non-finite values at positions {bad}")
    mean = float(v.mean())
    if n == 1:
        return mean, math.nan
    std = float(v.std(correction=0))
    return mean, 1.96 * std / math.sqrt(n)


def episode_metric(output: Tensor, target: Tensor, metric: str) -> float:
    """Accuracy of logits [n_query, N] against labels [n_query] (fraction in [0, 1]), or the
    mean squared error of predictions against targets of the same shape."""
    if metric == "accuracy":
        if output.ndim != 2 or output.shape[0] != target.shape[0]:
            raise ValueError(
                f"accuracy needs logits [n_query, N] and labels [n_query], got "
                f"{tuple(output.shape)} and {tuple(target.shape)}"
            )
        return float((output.argmax(dim=1) == target).double().mean())
    if metric == "mse":
        if output.shape != target.shape:
            raise ValueError(f"mse needs predictions shaped like targets {tuple(target.shape)}, "
                             f"got {tuple(output.shape)}")
        return float((output.double() - target.double()).pow(2).mean())
    raise ValueError(f"metric must be 'accuracy' or 'mse', got {metric!r}")


def evaluate(
    predict: Callable[[Tensor, Tensor, Tensor], Tensor],
    sampler: Any,
    episodes: int = 600,
    *,
    metric: str | None = None,
    start: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run ``predict`` on ``episodes`` test episodes and report mean +- 95% CI.

    Invariant: the episodes are those of meta-batches ``start, start + 1, ...`` of ``sampler``
    (whatever its current position), so two evaluations with the same sampler seed see the
    same tasks.

    Args:
        predict: ``predict(support_x, support_y, query_x)`` for ONE episode -> logits
            [n_query, N] (or predictions [n_query, out]); e.g. ``bilevel.load(path).predict``.
        sampler: an ``EpisodeSampler`` / ``SinusoidSampler`` on the test split.
        episodes: N >= 1 episodes (600 for 5-way, as common in the literature; MetaOptNet uses
            1000 for its final numbers).
        metric: ``"accuracy"`` or ``"mse"``; default from ``sampler.task``.
        start: first meta-batch number.
        device: move episodes there before calling ``predict``.
        progress: show a tqdm progress bar.

    Returns:
        ``{"metric", "mean", "ci95", "episodes", "values"}``; accuracy is a fraction in [0, 1];
        ``values`` holds the per-episode numbers.
    """
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"episodes must be an integer >= 1, got {episodes!r}")
    if metric is None:
        metric = "mse" if getattr(sampler, "task", "classification") == "regression" else "accuracy"
    values: list[float] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=episodes, desc=f"evaluate ({metric})")
    it = start
    while len(values) < episodes:
        take = min(sampler.meta_batch, episodes - len(values))
        batch = sampler.sample(it, indices=list(range(take)))
        if device is not None:
            batch = batch.to(device)
        for j in range(take):
            sx, sy, qx, qy = batch.episode(j)
            out = predict(sx, sy, qx)
            values.append(episode_metric(out.detach(), qy, metric))
        if bar is not None:
            bar.update(take)
        it += 1
    if bar is not None:
        bar.close()
    mean, ci = mean_ci(values)
    return {"metric": metric, "mean": mean, "ci95": ci, "episodes": episodes, "values": values}
