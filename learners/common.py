"""Shared pieces of the optimisation-based learners (MAML, Meta-SGD, Meta-Curvature, Meta-LSTM).

Each of these adapts a whole network to a task from a learned initialisation θ (= params0)
with some inner dynamics Φ whose coefficients are meta-learned too (= hparams); the subclasses
only say which dynamics and which hparams (Franceschi et al. 2018, §3, "learning-to-optimize").
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

import bilevel as bl
from bilevel.hypergrad import from_string
from bilevel.learner import MetaLearner
from bilevel.models import build_backbone


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


def check_inner_options(inner_steps: int, eval_steps: int | None, inner_lr: float | None) -> None:
    """Raise ``ValueError`` naming the option unless T ≥ 1 (train and test) and the step size > 0."""
    for name, v in (("inner_steps", inner_steps), ("eval_steps", eval_steps if eval_steps is not None else 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if inner_lr is not None and not inner_lr > 0:
        raise ValueError(f"inner_lr must be > 0, got {inner_lr!r}")


def param_key(name: str) -> str:
    """A module-attribute-safe key for a parameter name: ``"convs.0.weight"`` -> ``"convs-0-weight"``.

    ``nn.ParameterDict``/``nn.ModuleDict`` refuse dots; parameter names never contain ``-``, so
    the mapping is one-to-one.
    """
    return name.replace(".", "-")


def per_parameter(net: nn.Module, make: Callable[[str, Tensor], Tensor]) -> nn.ParameterDict:
    """One meta-learned tensor per parameter of ``net``: ``{param_key(name): make(name, param)}``."""
    return nn.ParameterDict({param_key(k): nn.Parameter(make(k, p.detach())) for k, p in net.named_parameters()})


class GradientLearner(MetaLearner):
    """Adapt the whole network per task: w_0 = θ, w_t = Φ_t(w_{t−1}, λ) on the support set.

    Invariant: the meta-loss is 1/B Σ_j E(w_T^j, D_query^j) with w_T^j from
    :func:`bilevel.solve` on episode j, so its gradient is the hypergradient w.r.t. θ and λ as
    computed by ``hypergrad``.

    Subclasses implement :meth:`dynamics` (Φ) and may add meta-learned tensors to
    :meth:`hparams`.

    Args:
        example_shape: [C, H, W] images or [D] vectors (filled in by the training loop).
        ways: N for classification (size of the head), ``None`` for regression.
        backbone: a name from :func:`bilevel.models.build_backbone` (``conv4``, ``conv4-32``, ``mlp``);
            default ``mlp`` for regression, ``conv4`` for images.
        backbone_options: extra backbone kwargs (e.g. ``{"filters": 32}``).
        inner_steps: T at training time.
        inner_lr: the inner step size α (initial value where it is learned).
        eval_steps: T at test time (default ``inner_steps``).
        hypergrad: the strategy as text (:func:`bilevel.hypergrad.from_string`), e.g.
            ``"reverse"`` (second order) or ``"first-order"``.
    """

    def __init__(
        self,
        *,
        example_shape: Sequence[int],
        ways: int | None,
        backbone: str | None = None,
        backbone_options: dict[str, Any] | None = None,
        inner_steps: int = 1,
        inner_lr: float = 0.4,
        eval_steps: int | None = None,
        hypergrad: str = "reverse",
        batch_tasks: str = "auto",
    ) -> None:
        super().__init__()
        check_inner_options(inner_steps, eval_steps, inner_lr)
        if batch_tasks not in ("auto", "always", "never"):
            raise ValueError(f"batch_tasks must be 'auto', 'always' or 'never', got {batch_tasks!r}")
        self.config = {
            "example_shape": list(example_shape), "ways": ways, "backbone": backbone,
            "backbone_options": dict(backbone_options or {}), "inner_steps": inner_steps,
            "inner_lr": float(inner_lr), "eval_steps": eval_steps, "hypergrad": hypergrad,
            "batch_tasks": batch_tasks,
        }
        self.batch_tasks = batch_tasks
        self.task = "regression" if ways is None else "classification"
        self.net = make_network(backbone, example_shape, ways, backbone_options)
        self.inner_steps = inner_steps
        self.eval_steps = eval_steps if eval_steps is not None else inner_steps
        self.inner_lr = float(inner_lr)
        self.strategy = from_string(hypergrad)
        self.problem = bl.BilevelProblem(self.task_loss, self.task_loss)
        self.batched_problem = bl.BilevelProblem(self.tasks_loss, self.tasks_loss)
        self._has_conv = any(isinstance(m, nn.Conv2d) for m in self.net.modules())

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
        out = self.predict_tasks(params, x)
        if self.task == "regression":
            return ((out - y) ** 2).flatten(1).mean(1).sum()
        b, n, k = out.shape
        return F.cross_entropy(out.reshape(b * n, k), y.reshape(b * n), reduction="sum") / n

    def uses_task_batching(self, device: torch.device) -> bool:
        """Whether :meth:`forward` runs the B tasks as one batched problem.

        ``"auto"``: yes, except for convolutional networks on CPU, where the batched
        (grouped) convolutions are slower than a loop over tasks (measured in
        ``benchmarks/maml_vs_peers.py``). Learners whose dynamics need per-task losses set
        ``supports_task_batching = False``.
        """
        if not self.supports_task_batching or self.batch_tasks == "never":
            return False
        if self.batch_tasks == "always":
            return True
        return device.type != "cpu" or not self._has_conv

    supports_task_batching = True

    def dynamics(self) -> bl.Dynamics:
        """Φ: the inner update rule (overridden by each method)."""
        raise NotImplementedError

    def hparams(self) -> dict[str, Tensor]:
        """Meta-learned tensors used by the dynamics (λ)."""
        return {}

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int) -> dict[str, Tensor]:
        """w_T for one task (support set [n, ...], labels [n])."""
        return bl.solve(self.problem, dict(self.net.named_parameters()), self.hparams(), (support_x, support_y),
                        dynamics=self.dynamics(), steps=steps, hypergrad=self.strategy)

    def adapt_tasks(self, support_x: Tensor, support_y: Tensor, steps: int) -> dict[str, Tensor]:
        """w_T for B tasks at once: one :func:`bilevel.solve` on stacked params [B, ...].

        Invariant: equals stacking :meth:`adapt` over the tasks (the tasks do not interact:
        the summed loss has a block-diagonal Hessian).
        """
        b = support_x.shape[0]
        params0 = {k: v.expand(b, *v.shape) for k, v in self.net.named_parameters()}
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


__all__ = ["GradientLearner", "check_inner_options", "make_network", "param_key", "per_parameter"]
