"""Per-feature L2 regularisation of multinomial logistic regression, against a grid over one L2 weight.

The inner problem fits logistic regression with one L2 weight per input feature,

    L(w, λ) = ℓ(w; D_tr) + ½ Σ_j exp(λ_j) ‖W_{:, j}‖²,     λ ∈ R^D (D = 64 or 784 hparams),

and the outer problem minimises the validation loss E(w) = ℓ(w; D_val). A grid search over one
shared weight exp(λ_j) ≡ α picks the starting point; hypergradient descent then moves each λ_j
on its own — far beyond what a grid can explore (Franceschi et al. 2018, §2; Pedregosa 2016).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from bilevel.dynamics import HeavyBall
from bilevel.hpo.config import ConvexConfig, split_help, strategy_text, task_runner
from bilevel.hpo.loop import HyperStep, hyper_loop, refit_and_evaluate, residual_summary, write_json
from bilevel.hpo.models import cross_entropy_loss, init_params, logistic_regression
from bilevel.options import OptionError, option
from bilevel.problem import BilevelProblem


@dataclass(frozen=True)
class L2Config(ConvexConfig):
    """Options of the ``l2`` task (see :class:`HPOConfig` and :class:`ConvexConfig` for the rest).

    Default hypergradient ``implicit-cg:300:0.001:tol=0.01:warm-start``, certified (:class:`ConvexConfig`).

    Attributes:
        grid_points: number of shared L2 weights tried, log-spaced over [10^grid_min, 10^grid_max].
        grid_min, grid_max: log10 bounds of the grid.
        per: ``"feature"`` (λ ∈ R^D, one weight per input feature) or ``"weight"`` (λ ∈ R^{K×D},
            one per entry of W: 7840 hyperparameters on MNIST).
    """

    TASK: ClassVar[str] = "l2"
    SPLITS: ClassVar[dict[str, tuple[int, int, int]]] = {"digits": (100, 500, 1197), "mnist": (1000, 2000, 4000)}
    LAMBDA_ROLE: ClassVar[str] = "the weights of the L2 penalty"

    n_train: int | None = option(None, help=split_help("Training", SPLITS, 0), min=1)
    n_val: int | None = option(None, help=split_help("Validation", SPLITS, 1), min=1)
    n_test: int | None = option(None, help=split_help("Test", SPLITS, 2), min=0)
    grid_points: int = option(13, help="Shared-L2 grid size.", min=1)
    grid_min: float = option(-6.0, help="log10 of the smallest grid value.", min=-30, max=10)
    grid_max: float = option(0.0, help="log10 of the largest grid value.", min=-30, max=10)
    per: str = option("feature", help="One L2 weight per feature or per weight entry.", choices=("feature", "weight"))

    def check(self) -> None:
        if self.grid_max < self.grid_min:
            raise OptionError("grid_max", f"grid_max={self.grid_max:g} is below grid_min={self.grid_min:g}")

    def grid(self) -> list[float]:
        """The shared L2 weights of the grid search, 10^grid_min … 10^grid_max."""
        if self.grid_points == 1:
            return [10.0 ** self.grid_min]
        step = (self.grid_max - self.grid_min) / (self.grid_points - 1)
        return [10.0 ** (self.grid_min + i * step) for i in range(self.grid_points)]


def feature_l2_loss(model: torch.nn.Module) -> Any:
    """L(w, λ; B) = ℓ(w; B) + ½ Σ_j exp(λ_j) ‖W_{:, j}‖², λ = ``hparams["log_l2"]`` [D] (or [K, D]: per entry)."""

    def inner_loss(params: dict[str, Tensor], hparams: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        penalty = (hparams["log_l2"].exp() * params["weight"] ** 2).sum()  # weight is [K, D]
        return F.cross_entropy(functional_call(model, params, (x,)), y) + 0.5 * penalty

    return inner_loss


@task_runner
def run_l2(config: L2Config) -> dict[str, Any]:
    """Grid-search one shared L2 weight, then tune one weight per feature by hypergradient descent.

    Writes ``log.csv``, ``metrics.json`` and ``l2.png`` into ``config.out``.

    Invariant: every λ compared (each grid point, the tuned vector) is scored by the same refit,
    ``eval_steps`` inner steps from w_0 = 0; the hyper-optimisation starts at the grid's best.

    Args:
        config: the task options.

    Returns:
        The metrics: ``grid`` (per point: ``l2``, ``val_loss``, ``test_loss``, accuracies),
        ``grid_best_l2``, ``grid_val_loss``, ``grid_test_loss``, ``tuned_val_loss``,
        ``tuned_test_loss``, accuracies, ``n_hparams`` and timings.

    Reference: Franceschi et al. (2018), §2; Pedregosa (2016), *Hyperparameter optimization
    with approximate gradient* (per-feature regularisation by implicit differentiation).
    """
    t_start = time.perf_counter()
    data = config.load_data()
    train, val = (data.train.x, data.train.y), (data.val.x, data.val.y)
    d = data.train.x.shape[1]
    shape = (d,) if config.per == "feature" else (data.num_classes, d)
    model = logistic_regression(d, data.num_classes).to(config.device)
    problem = BilevelProblem(feature_l2_loss(model), cross_entropy_loss(model))
    dynamics = HeavyBall(lr=config.inner_lr, momentum=config.inner_momentum)
    w0 = init_params(model, zeros=True)

    def refit(log_l2: Tensor) -> dict[str, float]:
        return refit_and_evaluate(problem, model, {"log_l2": log_l2}, train, data, params0=w0, dynamics=dynamics,
                                  steps=config.eval_steps)

    t_grid = time.perf_counter()
    grid = [{"l2": a, **refit(torch.full(shape, math.log(a), device=config.device))} for a in config.grid()]
    t_grid = time.perf_counter() - t_grid
    best = min(grid, key=lambda g: g["val_loss"])

    hparams = {"log_l2": torch.full(shape, math.log(best["l2"]), device=config.device, requires_grad=True)}
    optimizer = torch.optim.Adam(list(hparams.values()), lr=config.lr_hyper)
    strategy = config.hypergrad

    def record(h: dict[str, Tensor]) -> dict[str, float]:
        v = h["log_l2"].detach() / math.log(10.0)
        return {"log10_l2_mean": float(v.mean()), "log10_l2_min": float(v.min()), "log10_l2_max": float(v.max())}

    step = HyperStep(problem, train, val, dynamics=dynamics, steps=config.steps, hypergrad=strategy,
                     warm_start=config.warm_start, max_steps=config.max_inner_steps, record=record)
    t_hpo = time.perf_counter()
    history, _ = hyper_loop(step, step.init(hparams, optimizer, w0), config.hyper_steps, out=config.out, desc="hpo l2",
                            progress=config.progress)
    t_hpo = time.perf_counter() - t_hpo

    log_l2 = hparams["log_l2"].detach()
    tuned = refit(log_l2)
    metrics: dict[str, Any] = {
        "task": "l2",
        "n_hparams": log_l2.numel(),
        "grid_best_l2": best["l2"],
        "grid_val_loss": best["val_loss"],
        "grid_test_loss": best["test_loss"],
        "grid_test_accuracy": best["test_accuracy"],
        "tuned_val_loss": tuned["val_loss"],
        "tuned_test_loss": tuned["test_loss"],
        "tuned_test_accuracy": tuned["test_accuracy"],
        "val_loss_improvement": best["val_loss"] - tuned["val_loss"],
        "tuned_log10_l2": {"mean": float(log_l2.mean() / math.log(10)), "min": float(log_l2.min() / math.log(10)),
                           "max": float(log_l2.max() / math.log(10))},
        "grid": grid,
        "tuned": tuned,
        **residual_summary(history),
        "hypergrad": strategy_text(strategy),
        "grid_seconds": t_grid,
        "hpo_seconds": t_hpo,
        "total_seconds": time.perf_counter() - t_start,
        "config": config.summary(),
    }
    if config.out is not None:
        from bilevel.hpo.plots import plot_l2

        per_feature = log_l2 if log_l2.ndim == 1 else log_l2.mean(0)
        plot_l2(grid, tuned, per_feature / math.log(10.0), history, config.out_path("l2.png"))  # type: ignore[arg-type]
        write_json(config.out_path("metrics.json"), metrics)  # type: ignore[arg-type]
    return metrics


__all__ = ["L2Config", "feature_l2_loss", "run_l2"]
