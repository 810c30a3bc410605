"""The meta-learner protocol shared by every method in ``learners/`` and the training loop."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bilevel.data.sampler import Episodes

TASKS = ("classification", "regression")


class MetaLearner(nn.Module):
    """Base class of meta-learners: outer variables are this module's parameters.

    A meta-learner maps a batch of episodes to query predictions by adapting to each support
    set (the inner problem), and exposes the meta-loss whose gradient w.r.t. its parameters is
    the hypergradient (the outer problem; Franceschi et al. 2018, eq. (3.1)):

        f(λ) = 1/B Σ_j E(adapt(D_tr^j; λ), D_val^j),

    with λ = ``self.parameters()``. Subclasses implement :meth:`forward`; they may override
    :meth:`query_loss` (e.g. label smoothing, learned scale) and :meth:`meta_loss` (e.g.
    methods that do not split support/query). Module state (BatchNorm buffers) must not change
    during :meth:`forward`: the inner loops are functional (``torch.func.functional_call``).

    Attributes:
        task: ``"classification"`` or ``"regression"``.
        config: the JSON-like constructor arguments; ``type(self)(**config)`` rebuilds the
            learner (used by :func:`bilevel.save_model` / :func:`bilevel.load`).
    """

    task: str = "classification"

    def __init__(self) -> None:
        super().__init__()
        self.config: dict[str, Any] = {}

    @property
    def factory(self) -> str:
        """The import path ``module:Class`` that rebuilds this learner."""
        return f"{type(self).__module__}:{type(self).__qualname__}"

    def forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *, train: bool = True) -> Tensor:  # noqa: D401
        """Predictions for the queries of B episodes.

        Args:
            support_x: [B, n_support, *example_shape]; support_y: [B, n_support] int64 in
                0..N−1 (classification) or [B, n_support, out] float (regression).
            query_x: [B, n_query, *example_shape].
            train: training-time behaviour (e.g. inner steps, shot) versus test-time.

        Returns:
            logits [B, n_query, N] (classification) or predictions [B, n_query, out].
        """
        raise NotImplementedError

    def query_loss(self, pred: Tensor, query_y: Tensor) -> Tensor:
        """Per-episode outer loss E on the queries: [B] (cross-entropy or mean squared error)."""
        if self.task == "regression":
            return ((pred - query_y) ** 2).flatten(1).mean(1)
        b, q, n = pred.shape
        return F.cross_entropy(pred.reshape(b * q, n), query_y.reshape(b * q), reduction="none").reshape(b, q).mean(1)

    def metric(self, pred: Tensor, query_y: Tensor) -> Tensor:
        """Per-episode metric [B]: accuracy in [0, 1] (classification) or MSE (regression)."""
        if self.task == "regression":
            return ((pred.detach() - query_y) ** 2).flatten(1).mean(1)
        return (pred.detach().argmax(-1) == query_y).float().mean(1)

    def meta_loss(self, episodes: Episodes, *, train: bool = True) -> tuple[Tensor, Tensor]:
        """The meta-loss (mean over the B episodes) and the per-episode metric [B]."""
        pred = self(episodes.support_x, episodes.support_y, episodes.query_x, train=train)
        return self.query_loss(pred, episodes.query_y).mean(), self.metric(pred, episodes.query_y)

    def predict_episode(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, n_way: int | None) -> Tensor:
        """Predictions for one episode (the :class:`bilevel.io.FewShotLearner` protocol)."""
        with torch.no_grad():
            return self(support_x[None], support_y[None], query_x[None], train=False)[0]


def n_way_of(support_y: Tensor) -> int:
    """The number of classes N of a batch of classification episodes (labels 0..N−1)."""
    return int(support_y.max()) + 1


__all__ = ["MetaLearner", "TASKS", "n_way_of"]
