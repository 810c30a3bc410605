"""Few-shot evaluation: the one evaluator of validation, test and ``eval``.

As reported in the papers (e.g. MetaOptNet, Tables 1-3): ``mean +- 1.96 * std / sqrt(N)`` over
N test episodes, ``std`` being the population standard deviation (``np.std``, as the
MetaOptNet and ProtoNets evaluation code compute it).

One episode-selection rule: episode ``e`` (e = 0, 1, …) is episode 0 of meta-batch
``start + e`` of the sampler — the same episodes for every learner, every call and every
training meta-batch, given the sampler's seed. One metric naming: ``"accuracy"`` (fraction in
[0, 1]) or ``"mse"``.

An episode whose adaptation or prediction is not finite (a diverging inner loop) is recorded as
*diverged*; it never aborts the evaluation. The result then reports the mean ± CI and the median
over the finite episodes and the number ``diverged``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from bilevel import options as opts
from bilevel._engine import NonFiniteError
from bilevel.distributed import world
from bilevel.run_config import DataConfig, build_samplers
from bilevel.io import load
from bilevel.learner import MetaLearner
from bilevel.options import OptionError

__all__ = ["episode_metric", "evaluate", "evaluate_learner", "evaluate_model", "mean_ci", "summarize"]


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


def summarize(values: Sequence[float] | Tensor, metric: str) -> dict[str, Any]:
    """The evaluation record of per-episode values (NaN marks a diverged episode).

    Returns:
        ``{"metric", "mean", "ci95", "median", "episodes", "diverged"}``: mean ± 95% CI and median
        over the finite episodes (NaN if none is finite), ``episodes`` the number evaluated.
    """
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    finite = torch.isfinite(v)
    ok = v[finite]
    if ok.numel():
        mean, ci = mean_ci(ok)
        median = float(ok.quantile(0.5))  # the mean of the two middle values for an even count
    else:
        mean = ci = median = math.nan
    return {"metric": metric, "mean": mean, "ci95": ci, "median": median, "episodes": int(v.numel()),
            "diverged": int((~finite).sum())}


def _finite_rows(pred: Tensor) -> Tensor:
    return torch.isfinite(pred.detach()).reshape(pred.shape[0], -1).all(1)


def _learner_values(learner: Any, ep: Any) -> Tensor:
    """Per-episode metric of a batch of episodes; NaN for an episode that diverged.

    Episodes are run together; if that fails on a non-finite inner loss (batched tasks share one
    loss, so one exploding task poisons its batch) they are re-run one at a time.
    """
    try:
        with torch.no_grad():
            pred = learner(ep.support_x, ep.support_y, ep.query_x, train=False)
    except NonFiniteError:
        if ep.support_x.shape[0] == 1:
            return torch.full((1,), math.nan, dtype=torch.float64)
        return torch.cat([_learner_values(learner, type(ep)(*(t[j:j + 1] for t in ep))) for j in range(ep.support_x.shape[0])])
    values = learner.metric(pred, ep.query_y).detach().double().cpu()
    values[~_finite_rows(pred).cpu()] = math.nan
    return values


def evaluate_learner(learner: Any, sampler: Any, episodes: int, *, device: str | torch.device = "cpu",
                     progress: bool = False, desc: str = "evaluate", chunk: int = 8, start: int = 0) -> dict[str, Any]:
    """Evaluate a :class:`bilevel.learner.MetaLearner` (test-time behaviour) on ``episodes`` episodes.

    Invariant: the episodes are those of the module's rule (episode 0 of meta-batches
    ``start, start + 1, …``); they run ``chunk`` at a time. With several processes each rank
    evaluates every world-th episode and the values are gathered back in episode order, so the
    result is that of one process.

    Returns:
        :func:`summarize`'s record (``metric`` is ``"mse"`` for regression learners, else
        ``"accuracy"``).
    """
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"episodes must be an integer >= 1, got {episodes!r}")
    rank, size = world()
    mine = [e for e in range(episodes) if e % size == rank]
    values: list[Tensor] = []
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=episodes, desc=desc, leave=False)
    was_training = learner.training
    learner.eval()
    try:
        for i in range(0, len(mine), chunk):
            es = mine[i:i + chunk]
            parts = [sampler.sample(start + e, indices=[0]) for e in es]
            ep = type(parts[0])(*(torch.cat(f) for f in zip(*parts))).to(device)
            values.append(_learner_values(learner, ep))
            if bar is not None:
                bar.update(len(es) * size)
    finally:
        learner.train(was_training)
        if bar is not None:
            bar.close()
    local = torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)
    if size > 1:  # gather the values of all ranks, back in episode order (as one process has them)
        gathered: list[Any] = [None] * size
        dist.all_gather_object(gathered, (mine, local))
        local = torch.empty(episodes, dtype=torch.float64)
        for pos, vals in gathered:
            local[pos] = vals
    return summarize(local, "mse" if learner.task == "regression" else "accuracy")


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
    """Run ``predict`` on ``episodes`` test episodes and report mean ± 95% CI (same rule as the learners').

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
        :func:`summarize`'s record plus ``values`` (per-episode numbers, NaN where diverged).
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
    for e in range(episodes):
        batch = sampler.sample(start + e, indices=[0])
        if device is not None:
            batch = batch.to(device)
        sx, sy, qx, qy = batch.episode(0)
        try:
            out = predict(sx, sy, qx).detach()
        except NonFiniteError:
            values.append(math.nan)
        else:
            values.append(episode_metric(out, qy, metric) if bool(torch.isfinite(out).all()) else math.nan)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return {**summarize(values, metric), "values": values}


def evaluate_model(path: str | Path, episodes: int, *, data: Mapping[str, Any] | None = None,
                   overrides: Mapping[str, Any] | None = None, method: str | None = None, seed: int | None = None,
                   device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Evaluate a saved ``model.pt`` on its test split: mean ± 95% CI over ``episodes`` episodes.

    The dataset, ways, shots and queries are those the model was trained with (recorded in the
    file), unless ``data`` overrides them; the test episodes are those of a training run with
    ``seed`` (default: the model's own seed).

    Args:
        path: a ``model.pt`` written by :func:`fit` (or its folder).
        episodes: number of test episodes.
        data: :class:`DataConfig` fields to change (e.g. ``{"shots": 5}``).
        overrides: learner options to change at test time (e.g. ``{"eval_steps": 10}``).
        method: refuse a model of another registered learner (the CLI passes its method).
        seed: the test stream's seed.

    Returns:
        The evaluator's record plus ``{"learner", "dataset", "data"}``.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "model.pt"
    model = load(p, device=device, config_overrides=overrides)
    if method is not None and model.name != method:
        raise OptionError("checkpoint", f"{p} holds a {model.name!r} model, not {method!r}; evaluate it with "
                          f"`bilevel {model.name} eval`")
    learner = model.learner
    if not isinstance(learner, MetaLearner):
        raise OptionError("checkpoint", f"{p} does not hold a bilevel MetaLearner")
    saved = dict(model.metadata.get("data") or {"dataset": model.metadata.get("dataset", "glyphs")})
    values = {**saved, **dict(data or {})}
    config = opts.from_json(DataConfig, values, where=str(p))
    if learner.task == "classification":
        learner.check_ways(config.ways)
    samplers = build_samplers(config, model.metadata.get("seed", 0) if seed is None else seed, ("test",))
    if samplers.task != learner.task:
        raise OptionError("dataset", f"{p} is a {learner.task} model; dataset {config.dataset!r} is {samplers.task}")
    result = evaluate_learner(learner, samplers.test, episodes, device=device, progress=progress)
    return {**result, "learner": model.name, "dataset": config.dataset, "data": opts.to_json(config)}
