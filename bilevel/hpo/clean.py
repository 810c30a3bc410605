"""Data hyper-cleaning: learn one weight in [0, 1] per training example (Franceschi et al. 2017, §5.1).

A share of the training labels is flipped. The inner problem fits a multinomial logistic
regression to the *weighted* training loss

    L(w, λ) = (1/n) Σ_i c_i(λ) ℓ(w; x_i, y_i) + (reg/2) ‖W‖²,   c_i ∈ [0, 1],

and the outer problem picks the weights c that minimise the (clean) validation loss
E(w) = ℓ(w; D_val). Examples whose learned weight falls below ``threshold`` are flagged as
corrupted. c_i = sigmoid(λ_i) (``weights="sigmoid"``) or c_i = λ_i clamped onto [0, 1] after
each step (``weights="projection"``, projected hypergradient descent).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from bilevel.dynamics import HeavyBall
from bilevel.hpo.config import ConvexConfig, strategy_text, task_runner
from bilevel.hpo.data import corrupt_labels
from bilevel.hpo.loop import HyperStep, hyper_loop, refit_and_evaluate, residual_summary, write_json
from bilevel.hpo.models import cross_entropy_loss, f1_score, init_params, logistic_regression
from bilevel.options import option
from bilevel.problem import BilevelProblem

WEIGHTINGS = ("sigmoid", "projection")


@dataclass(frozen=True)
class CleanConfig(ConvexConfig):
    """Options of the ``clean`` task (see :class:`HPOConfig` and :class:`ConvexConfig` for the rest).

    Default hypergradient ``implicit-cg:300:0.001:tol=0.01:warm-start``, certified (:class:`ConvexConfig`).

    Attributes:
        corrupt_fraction: share of training labels flipped to another class, in [0, 1).
        weights: ``"sigmoid"`` (c = sigmoid(λ)) or ``"projection"`` (c = clamp(λ, 0, 1)).
        reg: L2 weight on W in the inner objective (keeps it strongly convex).
        threshold: examples with c_i < threshold are flagged as corrupted.
    """

    TASK: ClassVar[str] = "clean"
    DEFAULT_HYPER_LR: ClassVar[float] = 0.2
    LAMBDA_ROLE: ClassVar[str] = "the weights of the training examples"

    hyper_steps: int = option(60, help="Hyper-iterations (updates of the hyperparameters).", min=1)
    hyper_lr: float | None = option(None, help="Adam step size on the hyperparameters [default: 0.2 with sigmoid "
                                    "weights, 0.05 with projection].", min=0, min_open=True)
    eval_steps: int = option(500, help="Inner steps of the refits the reported numbers come from.", min=1)
    corrupt_fraction: float = option(0.5, help="Share of training labels flipped.", min=0, max=1, max_open=True)
    weights: str = option("sigmoid", help="How the weights stay in [0, 1]: sigmoid of λ, or λ projected.",
                          choices=WEIGHTINGS)
    reg: float = option(1e-3, help="Inner L2 weight on W.", min=0)
    threshold: float = option(0.5, help="Flag examples whose weight is below this.", min=0, max=1, min_open=True,
                              max_open=True)

    @property
    def lr_hyper(self) -> float:
        """Adam step on λ: 0.2 on sigmoid logits, 0.05 on projected weights (unless set)."""
        if self.hyper_lr is not None:
            return float(self.hyper_lr)
        return self.DEFAULT_HYPER_LR if self.weights == "sigmoid" else 0.05


def example_weights(hparams: dict[str, Tensor]) -> Tensor:
    """c(λ) ∈ [0, 1]^n: sigmoid of ``hparams["logit"]``, or ``hparams["c"]`` as it is (projected)."""
    return torch.sigmoid(hparams["logit"]) if "logit" in hparams else hparams["c"]


def mean_weights(weights: Tensor, corrupted: Tensor) -> dict[str, float]:
    """Mean learned weight of the clean and of the corrupted examples (a key only where there are any)."""
    out = {}
    for name, mask in (("mean_weight_clean", ~corrupted), ("mean_weight_corrupted", corrupted)):
        if bool(mask.any()):
            out[name] = float(weights[mask].mean())
    return out


def weighted_loss(model: torch.nn.Module, reg: float) -> Any:
    """L(w, λ; B) = mean_i c_i(λ) ℓ(w; x_i, y_i) + (reg/2)‖W‖² for a model called functionally."""

    def inner_loss(params: dict[str, Tensor], hparams: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        losses = F.cross_entropy(functional_call(model, params, (x,)), y, reduction="none")
        return (example_weights(hparams) * losses).mean() + 0.5 * reg * (params["weight"] ** 2).sum()

    return inner_loss


@task_runner
def run_clean(config: CleanConfig) -> dict[str, Any]:
    """Run data hyper-cleaning and write ``log.csv``, ``metrics.json``, ``weights_hist.png``, ``history.png``.

    Invariant: baseline (c ≡ 1), oracle (c = 1 on clean examples, 0 on corrupted ones) and the
    tuned weights are compared by the same refit (``eval_steps`` inner steps from w_0 = 0).

    Args:
        config: the task options.

    Returns:
        The metrics: ``test_accuracy``, ``baseline_accuracy``, ``oracle_accuracy``, ``f1``,
        ``precision``, ``recall``, ``gap_closed`` (share of the baseline→oracle test-accuracy gap
        closed), mean weights of clean and corrupted examples, losses and timings.

    Reference: Franceschi, Donini, Frasconi, Pontil (2017), *Forward and Reverse Gradient-Based
    Hyperparameter Optimization*, §5.1.
    """
    t_start = time.perf_counter()
    data = config.load_data()
    y_noisy, corrupted = corrupt_labels(data.train.y, config.corrupt_fraction, data.num_classes, generator=config.generator(1))
    train = (data.train.x, y_noisy)
    val = (data.val.x, data.val.y)
    n, d = data.train.x.shape
    model = logistic_regression(d, data.num_classes).to(config.device)
    problem = BilevelProblem(weighted_loss(model, config.reg), cross_entropy_loss(model))
    dynamics = HeavyBall(lr=config.inner_lr, momentum=config.inner_momentum)
    w0 = init_params(model, zeros=True)

    def refit(weights: Tensor) -> dict[str, float]:
        return refit_and_evaluate(problem, model, {"c": weights}, train, data, params0=w0, dynamics=dynamics, steps=config.eval_steps)

    ones = torch.ones(n, device=config.device)
    baseline, oracle = refit(ones), refit((~corrupted).float())

    if config.weights == "sigmoid":
        hparams = {"logit": torch.zeros(n, device=config.device, requires_grad=True)}
        project = None
    else:
        hparams = {"c": torch.full((n,), 0.5, device=config.device, requires_grad=True)}
        project = lambda h: h["c"].clamp_(0.0, 1.0)  # noqa: E731
    optimizer = torch.optim.Adam(list(hparams.values()), lr=config.lr_hyper)

    def record(h: dict[str, Tensor]) -> dict[str, float]:
        c = example_weights(h).detach()
        return {**mean_weights(c, corrupted), "f1": f1_score(c < config.threshold, corrupted)[2]}

    strategy = config.hypergrad
    step = HyperStep(problem, train, val, dynamics=dynamics, steps=config.steps, hypergrad=strategy,
                     warm_start=config.warm_start, max_steps=config.max_inner_steps, project=project, record=record)
    t_hpo = time.perf_counter()
    history, _ = hyper_loop(step, step.init(hparams, optimizer, w0), config.hyper_steps, out=config.out, desc="hpo clean",
                            progress=config.progress, show=("val_loss", "f1"))
    t_hpo = time.perf_counter() - t_hpo

    weights = example_weights(hparams).detach()
    tuned = refit(weights)
    precision, recall, f1 = f1_score(weights < config.threshold, corrupted)
    gap = oracle["test_accuracy"] - baseline["test_accuracy"]
    metrics: dict[str, Any] = {
        "task": "clean",
        "test_accuracy": tuned["test_accuracy"],
        "baseline_accuracy": baseline["test_accuracy"],
        "oracle_accuracy": oracle["test_accuracy"],
        "f1": f1,
        "precision": precision,
        "recall": recall,
        "gap_closed": (tuned["test_accuracy"] - baseline["test_accuracy"]) / gap if gap > 0 else None,
        **mean_weights(weights, corrupted),
        "n_corrupted": int(corrupted.sum()),
        "n_hparams": n,
        "tuned": tuned,
        "baseline": baseline,
        "oracle": oracle,
        **residual_summary(history),
        "hypergrad": strategy_text(strategy),
        "hpo_seconds": t_hpo,
        "total_seconds": time.perf_counter() - t_start,
        "config": config.summary(),
    }
    if config.out is not None:
        from bilevel.hpo.plots import plot_history, plot_weight_histogram

        plot_weight_histogram(weights, corrupted, config.out_path("weights_hist.png"), threshold=config.threshold)  # type: ignore[arg-type]
        plot_history(history, config.out_path("history.png"),  # type: ignore[arg-type]
                     [("validation loss", ["val_loss"]), ("mean weight", ["mean_weight_clean", "mean_weight_corrupted"]),
                      ("F1 (corrupted flagged)", ["f1"])], title="data hyper-cleaning")
        write_json(config.out_path("metrics.json"), metrics)  # type: ignore[arg-type]
    return metrics


__all__ = ["WEIGHTINGS", "CleanConfig", "example_weights", "mean_weights", "run_clean", "weighted_loss"]
