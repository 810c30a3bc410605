"""Shared pieces of the optimisation-based learners (MAML, Meta-SGD, Meta-Curvature, Meta-LSTM).

Each of these adapts a whole network to a task from a learned initialisation θ (= params0)
with some inner dynamics Φ whose coefficients are meta-learned too (= hparams); the subclasses
only say which dynamics and which hparams (Franceschi et al. 2018, §3, "learning-to-optimize").
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

import bilevel as bl
from bilevel.learner import LearnerConfig, MetaLearner
from bilevel.models import build_backbone
from bilevel.options import OptionError, option


@dataclass(frozen=True)
class BackboneConfig(LearnerConfig):
    """The network options every learner shares."""

    backbone: str | None = option(None, help="Backbone: conv4, conv4-32, resnet12, resnet12-cifar or mlp "
                                  "(default: mlp for vectors, conv4 for images).",
                                  choices=("conv4", "conv4-32", "resnet12", "resnet12-cifar", "mlp"))
    filters: int | None = option(None, help="Convolution filters of Conv-4 (paper: 64; 32 in the documented Omniglot recipes).", min=1)
    backbone_options: dict[str, Any] = option(default_factory=dict, help="Extra backbone keyword arguments.", cli=False)

    def network_options(self) -> dict[str, Any]:
        """``backbone_options`` with ``filters`` applied."""
        out = dict(self.backbone_options)
        if self.filters is not None:
            out["filters"] = self.filters
        return out


@dataclass(frozen=True)
class InnerLoopConfig(BackboneConfig):
    """Options of the learners that adapt a whole network with T inner steps from θ = w_0."""

    inner_steps: int = option(1, help="Inner steps T at training time.", min=1)
    eval_steps: int | None = option(None, help="Inner steps at test time (default: --inner-steps).", min=1, eval=True)
    batch_tasks: str = option("auto", help="Solve the tasks of a meta-batch as one batched problem: auto (MLPs, "
                              "and convolutions off CPU), always or never.", choices=("auto", "always", "never"))


@dataclass(frozen=True)
class GradientConfig(InnerLoopConfig):
    """Options of the learners whose meta-gradient is a hypergradient of the inner solve (θ = w_0)."""

    hypergrad: bl.Strategy = option(bl.Reverse(), help="Hypergradient strategy: reverse, first-order, truncated:K, "
                                    "checkpointed:K, forward, … (bilevel.hypergrad.from_string).")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_hypergrad()

    def check_hypergrad(self) -> None:
        """Refuse the strategies that give this method no meaningful meta-gradient (raise OptionError)."""
        if isinstance(self.hypergrad, (bl.Implicit, bl.NoInner)):
            raise OptionError("hypergrad", f"hypergrad={self.hypergrad!r} gives the initialisation θ no meta-gradient: the inner solution of a learner "
                              "adapted from θ does not depend on θ implicitly, and no-inner drops dw_T/dθ. Use "
                              "reverse, first-order, truncated:K, checkpointed:K or forward")


def make_network(backbone: str | None, example_shape: Sequence[int], ways: int | None, options: dict[str, Any] | None,
                 *, head: bool = True) -> nn.Module:
    """A backbone ending in a prediction head: ``ways`` logits, or one regression output.

    ``backbone=None`` picks ``mlp`` for regression and ``conv4`` for images. With
    ``head=False`` it is a representation instead (features [M, d]): images go through the
    backbone without its linear head (default ``conv4-32``), vectors through an MLP
    in -> 40 -> ReLU -> 40 (``options`` override ``hidden``/``out_features``).
    """
    opts = dict(options or {})
    if ways is None:
        if len(example_shape) != 1:
            raise ValueError(f"regression learners need vector inputs, got example shape {list(example_shape)}")
        opts = {**opts, "out_features": 1} if head else {"out_features": 40, "hidden": (40,), **opts}
        return build_backbone(backbone or "mlp", in_features=int(example_shape[0]), **opts)
    if len(example_shape) != 3:
        raise ValueError(f"classification learners need image inputs [C, H, W], got example shape {list(example_shape)}")
    c, h, _ = example_shape
    if head:
        opts["n_classes"] = int(ways)
    return build_backbone(backbone or ("conv4" if head else "conv4-32"), in_channels=int(c), image_size=int(h), **opts)


def summed_task_losses(pred: Tensor, y: Tensor, task: str) -> Tensor:
    """Σ_j L_j over B tasks: per-task mean cross-entropy of logits [B, n, N] against labels [B, n],
    or per-task mean squared error of predictions [B, n, out] against targets of that shape.

    Its gradient w.r.t. task j's own parameters is ∇L_j: the tasks of a batched inner problem
    do not interact (block-diagonal Hessian).
    """
    if task == "regression":
        # written out: F.mse_loss's double backward breaks under torch.func.jvp (Forward strategy) in torch 2.x
        return ((pred - y) ** 2).flatten(1).mean(1).sum()
    b, n, k = pred.shape
    return F.cross_entropy(pred.reshape(b * n, k), y.reshape(b * n), reduction="sum") / n


def episode_features(net: nn.Module, x: Tensor) -> Tensor:
    """``net`` on each of B episodes separately: [B, n, *example_shape] -> [B, n, d].

    BatchNorm statistics (``bn="task"``) stay per episode and per call (support and query are
    embedded by separate calls). On CPU the episodes go through the network one at a time:
    each episode's activations stay in cache, which beats one large batch (measured in
    ``benchmarks/hyper_repr_vs_peers.py``). On accelerators, one pass through the shared network
    with per-episode statistics (``episodes=B``) when the backbone supports it, else ``vmap``.
    """
    b, n = x.shape[:2]
    if x.device.type == "cpu":
        return torch.stack([net(x[j]) for j in range(b)])
    if "episodes" in inspect.signature(net.forward).parameters:
        return net(x.reshape(b * n, *x.shape[2:]), episodes=b).reshape(b, n, -1)
    return vmap(net)(x)


def param_key(name: str) -> str:
    """A module-attribute-safe key for a parameter name: ``"convs.0.weight"`` -> ``"convs-0-weight"``.

    ``nn.ParameterDict``/``nn.ModuleDict`` refuse dots; parameter names never contain ``-``, so
    the mapping is one-to-one.
    """
    return name.replace(".", "-")


def per_parameter(net: nn.Module, make: Callable[[str, Tensor], Tensor]) -> nn.ParameterDict:
    """One meta-learned tensor per parameter of ``net``: ``{param_key(name): make(name, param)}``."""
    return nn.ParameterDict({param_key(k): nn.Parameter(make(k, p.detach())) for k, p in net.named_parameters()})


@dataclass(frozen=True)
class StepSizeConfig(GradientConfig):
    """A :class:`GradientConfig` with an inner step size α."""

    inner_lr: float = option(0.4, help="Inner step size α (the initial value where it is learned).", min=0, min_open=True)


class GradientLearner(MetaLearner):
    """Adapt the whole network per task: w_0 = θ, w_t = Φ_t(w_{t−1}, λ) on the support set.

    Invariant: the meta-loss is 1/B Σ_j E(w_T^j, D_query^j) with w_T^j from
    :func:`bilevel.solve` on episode j, so its gradient is the hypergradient w.r.t. θ and λ as
    computed by ``config.hypergrad``.

    Subclasses set ``Config`` (a :class:`GradientConfig`, or an :class:`InnerLoopConfig` when
    they override :meth:`inner_strategy`), implement :meth:`dynamics` (Φ) and may add
    meta-learned tensors to :meth:`hparams` (and change w_0 with :meth:`initial_params`).
    Options: see :class:`GradientConfig` (``backbone``, ``filters``, ``inner_steps``,
    ``eval_steps``, ``hypergrad``, ``batch_tasks``).
    """

    Config = GradientConfig

    def __init__(self, *, example_shape: Sequence[int], ways: int | None, config: Any = None, **options: Any) -> None:
        super().__init__(example_shape=example_shape, ways=ways, config=config, **options)
        c = self.config
        self.batch_tasks = c.batch_tasks
        self.task = "regression" if ways is None else "classification"
        self.net = make_network(c.backbone, example_shape, ways, c.network_options())
        self.inner_steps = c.inner_steps
        self.eval_steps = c.eval_steps if c.eval_steps is not None else c.inner_steps
        self.strategy = self.inner_strategy()
        self.problem = bl.BilevelProblem(self.task_loss, self.task_loss)
        self.batched_problem = bl.BilevelProblem(self.tasks_loss, self.tasks_loss)
        self._has_conv = any(isinstance(m, nn.Conv2d) for m in self.net.modules())

    def check_ways(self, n_way: int) -> None:
        if self.ways is not None and n_way > self.ways:
            raise OptionError("ways", f"this {type(self).__name__} has a {self.ways}-way output layer; it cannot classify "
                              f"{n_way} classes (use at most {self.ways} ways)")

    # -- the inner problem --------------------------------------------------------------------
    def task_loss(self, params: dict[str, Tensor], hparams: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
        """L(w; D) on one task: cross-entropy (classification) or mean squared error."""
        x, y = batch
        out = functional_call(self.net, params, (x,))
        if self.task == "regression":
            # written out: F.mse_loss's double backward breaks under torch.func.jvp (Forward strategy) in torch 2.x
            return ((out - y) ** 2).mean()
        return F.cross_entropy(out, y)

    def predict_tasks(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """The network on B tasks at once: params stacked [B, ...], inputs [B, n, ...] -> [B, n, out]."""
        return vmap(lambda p, xx: functional_call(self.net, p, (xx,)))(params, x)

    def tasks_loss(self, params: dict[str, Tensor], hparams: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
        """Σ_j L(w_j; D_j) over B tasks with stacked params [B, ...]: its gradient w.r.t. the
        stacked params holds the B per-task gradients ∇L(w_j; D_j)."""
        x, y = batch
        return summed_task_losses(self.predict_tasks(params, x), y, self.task)

    def uses_task_batching(self, device: torch.device) -> bool:
        """Whether :meth:`forward` runs the B tasks as one batched problem.

        ``"auto"``: yes, except for convolutional networks on CPU, where the batched
        (grouped) convolutions are slower than a loop over tasks (measured in
        ``benchmarks/maml_vs_peers.py``). ``"auto"`` never does with ``Forward()``: its cost and memory grow with the
        number of differentiated entries, B·|θ| for stacked tasks against |θ| per task (``"always"`` still stacks). Learners whose
        dynamics need per-task losses set ``supports_task_batching = False``.
        """
        if not self.supports_task_batching or self.batch_tasks == "never":
            return False
        if self.batch_tasks == "always":
            return True
        if isinstance(self.strategy, bl.Forward):  # forward mode: m = every task's copy of θ; per task m = |θ|
            return False
        return device.type != "cpu" or not self._has_conv

    supports_task_batching = True

    def dynamics(self) -> bl.Dynamics:
        """Φ: the inner update rule (overridden by each method)."""
        raise NotImplementedError

    def hparams(self) -> dict[str, Tensor]:
        """Meta-learned tensors used by the dynamics (λ)."""
        return {}

    def inner_strategy(self) -> bl.Strategy:
        """How the inner solve is differentiated: ``config.hypergrad`` (overridden by methods without one)."""
        return self.config.hypergrad

    def initial_params(self) -> dict[str, Tensor]:
        """w_0 of every task: θ, differentiated through the unrolled dynamics (iMAML: a constant copy)."""
        return dict(self.net.named_parameters())

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int) -> dict[str, Tensor]:
        """w_T for one task (support set [n, ...], labels [n])."""
        return bl.solve(self.problem, self.initial_params(), self.hparams(), (support_x, support_y),
                        dynamics=self.dynamics(), steps=steps, hypergrad=self.strategy)

    def adapt_tasks(self, support_x: Tensor, support_y: Tensor, steps: int) -> dict[str, Tensor]:
        """w_T for B tasks at once: one :func:`bilevel.solve` on stacked params [B, ...].

        Invariant: equals stacking :meth:`adapt` over the tasks (the tasks do not interact:
        the summed loss has a block-diagonal Hessian).
        """
        b = support_x.shape[0]
        params0 = {k: v.expand(b, *v.shape) for k, v in self.initial_params().items()}
        return bl.solve(self.batched_problem, params0, self.hparams(), (support_x, support_y),
                        dynamics=self.dynamics(), steps=steps, hypergrad=self.strategy)

    def forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *, train: bool = True) -> Tensor:
        steps = self.inner_steps if train else self.eval_steps
        if self.uses_task_batching(support_x.device):
            return self.predict_tasks(self.adapt_tasks(support_x, support_y, steps), query_x)
        preds = []
        for j in range(support_x.shape[0]):
            w = self.adapt(support_x[j], support_y[j], steps)
            preds.append(functional_call(self.net, w, (query_x[j],)))
        return torch.stack(preds)


__all__ = ["BackboneConfig", "GradientConfig", "GradientLearner", "InnerLoopConfig", "StepSizeConfig", "episode_features", "make_network", "param_key",
           "per_parameter", "summed_task_losses"]
