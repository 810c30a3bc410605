"""Learning rate and momentum of SGD with momentum, tuned by hypergradient descent.

The inner dynamics is heavy-ball SGD on mini-batches B_t of the training set,

    v_t = μ v_{t-1} + ∇ℓ(w_{t-1}; B_t),   w_t = w_{t-1} − η_t v_t,   t = 1..T,

with λ = (log η, logit μ) — or a whole schedule (log η_1, …, log η_T) with ``schedule=True`` —
and the outer objective is the validation loss E(w_T) (Franceschi et al. 2017, §2 and §5.2;
Franceschi et al. 2018, eq. (2.1)). The hypergradient needs the dynamics itself, not just its
end point, so it comes from unrolled differentiation: ``Forward()`` (memory flat in T, cost ∝ the
number of hyperparameters), ``Reverse()``, ``Checkpointed(k)`` or ``Truncated(k)``; implicit,
first-order and no-inner hypergradients are refused (:meth:`LRConfig.refusal` says why).

``online=True`` is real-time HO (Franceschi et al. 2017, §3.2 and §5.2): one inner run of
``hyper_steps × inner_steps`` steps, λ updated after every segment of ``inner_steps`` steps with
the hypergradient of the validation loss at the current w_t — forward mode carries dZ_t/dλ across
segments (RTRL), reverse/truncated treat the segment's starting state as a constant.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from bilevel.dynamics import HeavyBall
from bilevel.hpo.config import HPOConfig, strategy_text, task_runner
from bilevel.hpo.data import TaskData, minibatches
from bilevel.hpo.loop import HyperState, apply_hypergradient, hyper_loop, write_json
from bilevel.hpo.models import cross_entropy_loss, evaluate, init_params, mlp
from bilevel.hypergrad import FirstOrder, Forward, Implicit, NoInner, Reverse, Strategy
from bilevel.options import OptionError, option
from bilevel.problem import BilevelProblem
from bilevel.solve import HypergradientState, hypergradient, solve

_UNROLLED = "Use forward, reverse, checkpointed:K or truncated:K"


@dataclass(frozen=True)
class LRConfig(HPOConfig):
    """Options of the ``lr`` task (see :class:`HPOConfig` for the shared ones).

    λ = (η, μ) are coefficients of the inner dynamics, so only unrolled hypergradients see them:
    ``forward`` (default), ``reverse`` (default with ``schedule``: T + 1 hyperparameters),
    ``checkpointed:K`` and ``truncated:K`` (K ≤ T). Refused, with the reason: ``implicit-*`` (the
    inner minimiser does not depend on η, μ: zero), ``no-inner`` (zero) and ``first-order`` (it
    drops the curvature through which η and μ act on later steps; at large η it points the wrong
    way, e.g. the opposite sign of the exact hypergradient at η = 1, μ = 0.95).

    Attributes:
        lr, momentum: the initial η and μ (μ in (0, 1)).
        schedule: tune one learning rate per inner step t = 1..T (plus μ).
        online: real-time HO within one inner run (see the module docstring).
        batch_size: |B_t|.
        hidden: width of the one-hidden-layer tanh network.
        inner_steps: T offline (default 100), or the segment length online (default 20).
    """

    TASK: ClassVar[str] = "lr"

    hyper_steps: int = option(40, help="Hyper-iterations (updates of the hyperparameters).", min=1)
    inner_steps: int | None = option(None, help="Inner steps T per hypergradient [default: 100; with --online, the "
                                     "length of each segment: 20].", min=1)
    hypergrad: Strategy | None = option(None, help="Hypergradient strategy: forward [default], reverse [default with "
                                        "--schedule], checkpointed:K or truncated:K (K <= T); implicit-*, no-inner and "
                                        "first-order are refused, each with its reason.")
    lr: float = option(0.01, help="Initial learning rate η.", min=0, min_open=True)
    momentum: float = option(0.5, help="Initial momentum μ.", min=0, max=1, min_open=True, max_open=True)
    schedule: bool = option(False, help="Tune one learning rate per inner step.")
    online: bool = option(False, help="Real-time HO: update λ every --inner-steps within one run.")
    batch_size: int = option(100, help="Mini-batch size.", min=1)
    hidden: int = option(64, help="Hidden width of the MLP.", min=1)

    def default_hypergrad(self) -> Strategy:
        """Forward mode for (η, μ); reverse mode for a schedule (T + 1 hyperparameters)."""
        return Reverse() if self.schedule else Forward()

    def refusal(self, strategy: Strategy) -> str | None:
        if isinstance(strategy, Implicit):
            return ("the learning rate and momentum are coefficients of the inner dynamics, not arguments of the inner "
                    f"objective: its minimiser does not depend on them, so the implicit hypergradient is zero. {_UNROLLED}")
        if isinstance(strategy, NoInner):
            return ("no-inner treats w_T as a constant, and the validation loss depends on η and μ only through w_T: the "
                    f"hypergradient would be zero. {_UNROLLED}")
        if isinstance(strategy, FirstOrder):
            return ("first-order treats the inner gradients as constants, so it drops the curvature through which η and μ "
                    "act on the later steps: a greedy estimate that keeps raising η when training becomes unstable "
                    f"(it has the opposite sign of the exact hypergradient there). {_UNROLLED}")
        return None

    def check(self) -> None:
        if self.schedule and self.online:
            raise OptionError("schedule", "schedule and online cannot be combined: a per-step schedule is tuned offline, over whole runs")

    @property
    def steps(self) -> int:
        """T per hypergradient (offline) or per segment (online)."""
        if self.inner_steps is not None:
            return self.inner_steps
        return 20 if self.online else 100

    @property
    def eval_steps(self) -> int:
        """Length of the runs the initial and tuned λ are compared on: T, or the whole online run."""
        return self.steps * self.hyper_steps if self.online else self.steps


def heavy_ball(schedule: bool = False) -> HeavyBall:
    """SGD with momentum whose η = exp(λ["log_lr"]) (indexed by t when a schedule) and μ = sigmoid(λ["logit_momentum"])."""
    lr = (lambda h, t: h["log_lr"][t - 1].exp()) if schedule else (lambda h: h["log_lr"].exp())
    return HeavyBall(lr=lr, momentum=lambda h: torch.sigmoid(h["logit_momentum"]))


def lr_momentum(hparams: dict[str, Tensor]) -> dict[str, float]:
    """The η (mean, min, max over a schedule) and μ that λ stands for, as floats."""
    lr = hparams["log_lr"].detach().exp()
    out = {"lr": float(lr.mean()), "momentum": float(torch.sigmoid(hparams["logit_momentum"].detach()))}
    if lr.numel() > 1:
        out.update(lr_min=float(lr.min()), lr_max=float(lr.max()))
    return out


def _losses(model: torch.nn.Module, params: dict[str, Tensor], data: TaskData) -> dict[str, float]:
    (tr, tr_acc), (va, va_acc), (te, te_acc) = (evaluate(model, params, s) for s in (data.train, data.val, data.test))
    return {"train_loss": tr, "val_loss": va, "test_loss": te, "train_accuracy": tr_acc, "val_accuracy": va_acc, "test_accuracy": te_acc}


@task_runner
def run_lr(config: LRConfig) -> dict[str, Any]:
    """Tune η and μ (or η_1..η_T and μ) of heavy-ball SGD; write ``log.csv``, ``metrics.json``, ``lr.png``.

    Invariant: the initial and the tuned λ are compared on the same run — same w_0, same
    mini-batch sequence, ``config.eval_steps`` steps — scored on the full train/val/test sets.

    Args:
        config: the task options.

    Returns:
        The metrics: ``initial`` and ``tuned`` (η, μ and train/val/test loss and accuracy of that
        run), ``initial_lr``, ``tuned_lr``, ``initial_momentum``, ``tuned_momentum``,
        ``initial_train_loss``, ``tuned_train_loss``, ``initial_val_loss``, ``tuned_val_loss``,
        the online run's own final losses when ``online``, and timings.

    Reference: Franceschi, Donini, Frasconi, Pontil (2017), *Forward and Reverse Gradient-Based
    Hyperparameter Optimization*, §3 and §5.2.
    """
    t_start = time.perf_counter()
    data = config.load_data()
    d, k, T = data.train.x.shape[1], data.num_classes, config.steps
    model = mlp(d, config.hidden, k).to(config.device)
    loss = cross_entropy_loss(model)
    problem = BilevelProblem(loss, loss)
    dynamics = heavy_ball(config.schedule)
    val = (data.val.x, data.val.y)
    log_lr = torch.full((T,) if config.schedule else (), math.log(config.lr), device=config.device)
    hparams = {"log_lr": log_lr.requires_grad_(True),
               "logit_momentum": torch.tensor(math.log(config.momentum / (1 - config.momentum)), device=config.device, requires_grad=True)}
    initial = {k_: v.detach().clone() for k_, v in hparams.items()}
    optimizer = torch.optim.Adam(list(hparams.values()), lr=config.lr_hyper)
    strategy = config.hypergrad

    def draw(stream: int, steps: int) -> tuple[dict[str, Tensor], Any]:
        g = config.generator(stream)
        return {k_: v.to(config.device) for k_, v in init_params(model, generator=g).items()}, minibatches(data.train, config.batch_size, steps, generator=g)

    if config.online:
        params0, batches = draw(2, T * config.hyper_steps)

        def step(it: int, state: HyperState) -> tuple[dict[str, float], HyperState]:
            """The next T steps of the one online run (continuing from ``state.inner``), then one update of λ."""
            row = lr_momentum(state.hparams)
            hg, carried = hypergradient(problem, HypergradientState(state.inner), state.hparams, batches, val,
                                        dynamics=dynamics, steps=T, hypergrad=strategy, return_state=True)
            apply_hypergradient(state.optimizer, state.hparams, hg.hparams)
            return {"val_loss": float(hg.value), **row}, state._replace(inner=carried.inner)
    else:
        params0 = None

        def step(it: int, state: HyperState) -> tuple[dict[str, float], HyperState]:
            """A fresh run of T steps from its own w_0 and mini-batches (stream 10 + it), then one update of λ."""
            row = lr_momentum(state.hparams)
            w0, batches = draw(10 + it, T)
            hg = hypergradient(problem, w0, state.hparams, batches, val, dynamics=dynamics, steps=T, hypergrad=strategy)
            apply_hypergradient(state.optimizer, state.hparams, hg.hparams)
            return {"val_loss": float(hg.value), **row}, state

    t_hpo = time.perf_counter()
    history, final = hyper_loop(step, HyperState(hparams, optimizer, params0), config.hyper_steps, out=config.out,
                                desc="hpo lr", progress=config.progress, show=("val_loss", "lr", "momentum"))
    t_hpo = time.perf_counter() - t_hpo

    def final_run(h: dict[str, Tensor]) -> dict[str, float]:
        params0, batches = draw(1, config.eval_steps)
        with torch.no_grad():
            w = solve(problem, params0, h, batches, dynamics=dynamics, steps=config.eval_steps)
        return {**lr_momentum(h), **_losses(model, w, data)}

    tuned_h = {k_: v.detach() for k_, v in hparams.items()}
    before, after = final_run(initial), final_run(tuned_h)
    metrics: dict[str, Any] = {
        "task": "lr",
        "mode": "online" if config.online else "offline",
        "initial_lr": before["lr"],
        "tuned_lr": after["lr"],
        "initial_momentum": before["momentum"],
        "tuned_momentum": after["momentum"],
        "initial_train_loss": before["train_loss"],
        "tuned_train_loss": after["train_loss"],
        "initial_val_loss": before["val_loss"],
        "tuned_val_loss": after["val_loss"],
        "initial": before,
        "tuned": after,
        "eval_steps": config.eval_steps,
        "hypergrad": strategy_text(strategy),
        "hpo_seconds": t_hpo,
        "total_seconds": time.perf_counter() - t_start,
        "config": config.summary(),
    }
    if config.schedule:
        metrics["tuned_schedule"] = tuned_h["log_lr"].exp().tolist()
    if config.online:
        end = final.inner  # the InnerState where the online run stopped
        metrics["online_run"] = _losses(model, {k_: v.detach() for k_, v in dynamics.params(end.dynamics_state).items()}, data)  # type: ignore[union-attr]
    if config.out is not None:
        from bilevel.hpo.plots import plot_history, plot_schedule

        panels = [("learning rate", ["lr"] + (["lr_min", "lr_max"] if config.schedule else [])),
                  ("momentum", ["momentum"]), ("validation loss", ["val_loss"])]
        title = f"{'online' if config.online else 'offline'} HO of SGD-momentum, {strategy_text(strategy)}"
        plot_history(history, config.out_path("lr.png"), panels, title=title, log_y=("learning rate",))  # type: ignore[arg-type]
        if config.schedule:
            plot_schedule(tuned_h["log_lr"].exp(), config.out_path("schedule.png"), initial=config.lr)  # type: ignore[arg-type]
        write_json(config.out_path("metrics.json"), metrics)  # type: ignore[arg-type]
    return metrics


__all__ = ["LRConfig", "heavy_ball", "lr_momentum", "run_lr"]
