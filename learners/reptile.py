"""Reptile (Nichol, Achiam, Schulman 2018, "On First-Order Meta-Learning Algorithms").

For each task τ_j of a meta-batch, T steps of gradient descent (or Adam) on the task's training
data from the initialisation θ give φ_T^j = U_τj^T(θ); the initialisation then moves towards
the adapted weights (Algorithm 2, batched version):

    θ ← θ + ε · 1/B Σ_j (φ_T^j − θ).

No derivative of the inner loop is taken. In the shared training loop the update direction is
fed as a meta-"gradient": ``meta_loss`` is a surrogate whose gradient is exactly

    g = 1/B Σ_j (θ − φ_T^j),

so an outer optimiser step θ ← θ − β g is the paper's update with ε = β. With plain SGD
(``--optimizer sgd --momentum 0 --outer-lr ε``) the outer learning rate *is* the paper's ε;
with Adam (this project's default outer optimiser, 10⁻³) the direction is rescaled per
coordinate, as in most Reptile implementations.

Training data of a task (``inner_set``): the paper's few-shot tasks have no query set at
meta-training time (the inner loop trains on all the "training shots" of the task, §6 and
App. A: 10 shots per class on Omniglot for 1-shot evaluation), so by default the inner loop runs
on support ∪ query of the training episodes (K + Q examples per class); ``inner_set="support"``
uses the K support examples only. At test time the adaptation uses the support set and the
query set is predicted, as for every learner. The paper's inner loop takes mini-batches of the
task data; here every inner step uses all of it (full-batch gradient descent).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import functional_call

import bilevel as bl
from bilevel.data.sampler import Episodes
from bilevel.options import option
from learners.common import GradientLearner, InnerLoopConfig, summed_task_losses

INNER_SETS = ("support+query", "support")


@dataclass(frozen=True)
class ReptileConfig(InnerLoopConfig):
    """Reptile's options: the inner loop (steps, step size, optimiser, data); no hypergradient strategy."""

    inner_steps: int = option(5, help="Inner steps T on each training task.", min=1,
                              paper="Nichol et al. 2018, App. A: 5 (Omniglot), 8 (mini-ImageNet)")
    inner_lr: float = option(0.1, help="Inner step size (fixed; may differ at test time).", min=0, min_open=True,
                             eval=True, paper="Nichol et al. 2018, App. A: Adam 1e-3 with β1 = 0")
    inner_optimizer: str = option("gd", help="Inner optimiser: gd, or adam with β1 = 0 as the paper.",
                                  choices=("gd", "adam"))
    inner_set: str = option("support+query", help="Training data of a meta-training task: support+query (the "
                            "paper: all of the task's training shots) or support.", choices=INNER_SETS)


class Reptile(GradientLearner):
    """Reptile (Nichol et al. 2018): move the initialisation towards the weights adapted to each task.

    Invariant: at training time ``meta_loss`` returns a loss whose value is the mean inner loss
    at φ_T (on the inner set) and whose gradient w.r.t. θ is exactly 1/B Σ_j (θ − φ_T^j),
    with φ_T^j from T steps of the inner dynamics on episode j's inner set (nothing of the inner
    loop is differentiated); the per-episode metric is the accuracy (or MSE) of φ_T^j on the
    episode's queries (training examples of the inner loop when ``inner_set="support+query"``).
    At test time (``train=False``) it is the ordinary few-shot protocol: ``eval_steps`` steps on
    the support set, the query loss and metric.

    Options (:class:`ReptileConfig`): ``inner_steps`` (T, default 5), ``eval_steps`` (default
    T), ``inner_lr`` (α, default 0.1), ``inner_optimizer`` (``gd``, or ``adam`` with β1 = 0 as
    in the paper's classification experiments), ``inner_set``, ``batch_tasks`` and the backbone
    options. The outer learning rate is the paper's ε with ``--optimizer sgd`` without momentum.
    """

    Config = ReptileConfig

    def inner_strategy(self) -> bl.Strategy:
        """The inner loop is never differentiated."""
        return bl.NoInner()

    def dynamics(self) -> bl.Dynamics:
        lr = self.config.inner_lr
        # eps outside the square root only (as torch.optim.Adam): the inner loop is never differentiated
        adam = bl.Adam(lr=lr, b1=0.0, eps_root=0.0)
        return adam if self.config.inner_optimizer == "adam" else bl.GradientDescent(lr=lr)

    def inner_set(self, episodes: Episodes) -> tuple[Tensor, Tensor]:
        """The (inputs, targets) of the inner loop at training time: [B, n, ...] and [B, n(, out)]."""
        if self.config.inner_set == "support":
            return episodes.support_x, episodes.support_y
        return (torch.cat([episodes.support_x, episodes.query_x], dim=1),
                torch.cat([episodes.support_y, episodes.query_y], dim=1))

    def adapted_weights(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """φ_T of every task, stacked [B, ...] (constants: no graph), after ``inner_steps`` steps on (x, y)."""
        with torch.no_grad():
            if self.uses_task_batching(x.device):
                return self.adapt_tasks(x, y, self.inner_steps)
            per_task = [self.adapt(x[j], y[j], self.inner_steps) for j in range(x.shape[0])]
            return {k: torch.stack([w[k] for w in per_task]) for k in per_task[0]}

    def predict_each(self, phi: dict[str, Tensor], x: Tensor) -> Tensor:
        """Task j's network φ^j on its inputs x[j] (stacked params [B, ...], inputs [B, n, ...])."""
        if self.uses_task_batching(x.device):
            return self.predict_tasks(phi, x)
        return torch.stack([functional_call(self.net, {k: v[j] for k, v in phi.items()}, (x[j],))
                            for j in range(x.shape[0])])

    def meta_loss(self, episodes: Episodes, *, train: bool = True) -> tuple[Tensor, Tensor]:
        """Training: the Reptile surrogate (value: the inner loss at φ_T; gradient: 1/B Σ_j (θ − φ_T^j)).
        Test: the query loss after adaptation on the support set."""
        if not train:
            return super().meta_loss(episodes, train=False)
        x, y = self.inner_set(episodes)
        phi = self.adapted_weights(x, y)
        theta = dict(self.net.named_parameters())
        b = x.shape[0]
        # ½ Σ_k ‖θ_k − φ_k‖² averaged over the tasks: its gradient is θ − mean_j φ_T^j
        surrogate = 0.5 * sum(((theta[k] - phi[k]) ** 2).sum() for k in theta) / b
        with torch.no_grad():
            inner = summed_task_losses(self.predict_each(phi, x), y, self.task) / b
            metric = self.metric(self.predict_each(phi, episodes.query_x), episodes.query_y)
        return inner + surrogate - surrogate.detach(), metric


__all__ = ["INNER_SETS", "Reptile", "ReptileConfig"]
