"""Hyper-Representation (Franceschi, Frasconi, Donini, Pontil 2018, §4 and Appendix A).

The outer variable λ is a representation h(x; λ) shared by all episodes (a Conv-4 with 32
filters by default); the ground model of episode j is a multinomial logistic regressor
g^j(z) = z W^j + b^j on the features z = h(x), initialised at W^j = 0, b^j = 0 and trained by
T steps of gradient descent with a learned step size η = exp(log η) on the support
cross-entropy. The meta-loss is the query cross-entropy at (W_T^j, b_T^j), eq. (3.1):

    f(λ, η) = 1/B Σ_j E(w_T^j(λ, η), h(D_val^j; λ)).

The B ground problems of a meta-batch are one batched problem (w = {W [B, d, N], b [B, N]},
inner loss Σ_j L^j, whose gradient w.r.t. task j's block is task j's own), solved by a single
:func:`bilevel.solve`; the representation is evaluated once per meta-batch (``vmap`` over the
episodes, so BatchNorm statistics stay per episode and per set). For regression data (the
sinusoid) the ground models are linear least-squares regressors on the features instead.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import bilevel as bl
from bilevel.data.sampler import Episodes
from bilevel.hypergrad import Forward, NoInner, Strategy
from bilevel.learner import MetaLearner
from bilevel.options import OptionError, option
from learners.common import (
    BackboneConfig,
    episode_features,
    make_network,
    summed_task_losses,
)

VARIANTS = ("bilevel", "approx", "classic")


@dataclass(frozen=True)
class HyperReprConfig(BackboneConfig):
    """Hyper-Representation's options."""

    inner_steps: int = option(5, help="Inner steps T of the ground models at training time.", min=1)
    inner_lr: float | None = option(None, help="Initial ground-model step size η (learned for --variant bilevel; "
                                    "default 0.1, or 0.01 for regression).", min=0, min_open=True)
    eval_steps: int | None = option(None, help="Inner steps at test time (default: --inner-steps).", min=1, eval=True)
    hypergrad: Strategy | None = option(None, help="Hypergradient strategy (default reverse; implicit-cg:K needs --l2 > 0; "
                                        "forward differentiates η only).")
    variant: str = option("bilevel", help="bilevel, approx (no-inner) or classic (joint multitask), App. A.",
                          choices=VARIANTS, paper="Franceschi et al. 2018, App. A")
    l2: float = option(0.0, help="Ridge penalty (l2/2)·‖W‖² of each ground problem (paper: 0; implicit strategies need > 0).",
                       min=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant != "bilevel" and self.hypergrad not in (None, NoInner()):
            raise OptionError("hypergrad", f"variant={self.variant!r} fixes the hypergradient to no-inner (∂w_T/∂λ = 0); "
                              f"got hypergrad={self.hypergrad!r}")
        if isinstance(self.hypergrad, bl.Implicit) and self.l2 == 0:
            raise OptionError("l2", "an implicit hypergradient needs a unique inner minimiser, but with l2 = 0 the ground "
                              "problems (logistic or least-squares heads on few-shot features, which are separable / "
                              "underdetermined) have none: the implicit gradient is then wrong (measured: cosine 0.59 "
                              "with the unrolled one). Pass --l2 > 0 (e.g. 0.5, with enough --inner-steps for the heads "
                              "to converge) or use reverse")


class HyperRepr(MetaLearner):
    """Hyper-Representation (Franceschi et al. 2018): a meta-learned representation under per-episode logistic heads.

    Invariant (``variant="bilevel"``): ``meta_loss`` is f(λ, η) of the module docstring and its
    gradient is the hypergradient of the chosen strategy:

    * ``"reverse"`` (default): exact, back-propagating through the T steps; h and η both get it.
    * ``"implicit…"`` (e.g. ``"implicit-cg:20"``): implicit differentiation of ∇_w L = 0 at w_T;
      exact only when w_T is stationary, so use ``l2 > 0`` (with separable few-shot data and
      l2 = 0 the inner problem has no minimiser) and enough steps. η gets zero (the minimiser
      does not depend on it).
    * ``"forward"``: forward mode for η only. The support features are then passed as
      constants (forward mode costs one tangent per differentiated entry, and there are
      B·n·d of them), so η receives its exact hypergradient while the representation receives
      only the direct term ∂E/∂λ through h(query_x) with w_T held fixed — the same signal as
      ``variant="approx"``.
    * any other :func:`bilevel.hypergrad.from_string` form (``first-order``, ``truncated:K``,
      ``checkpointed:K``) with its documented meaning.

    Appendix A variants:

    * ``variant="approx"``: ∂w_T/∂λ = 0 (:class:`bilevel.NoInner`), train/val split kept: h is
      trained on the query loss through h(query_x) only; η receives no gradient (frozen).
    * ``variant="classic"``: joint multitask learning, min over (λ, w^1..w^B) of
      Σ_j L^j(w^j, h(D^j)) with no train/val split. Expressed as a meta-learner: at training
      time each episode's support ∪ query is one training set D^j; w^j is minimised over from 0
      by the T steps at fixed λ, then the outer optimiser steps λ along the partial gradient
      ∂/∂λ Σ_j L^j(w_T^j, h(D^j; λ)) with w_T^j fixed (NoInner) — block-coordinate descent on
      the joint objective, with fresh episodes (hence fresh w^j) at every outer step. η is
      frozen. At test time every variant trains the ground model on the support and
      predicts the queries.

    Options (:class:`HyperReprConfig`): ``backbone`` (default ``conv4-32``; ``mlp`` for vectors;
    it must be pure: ``bn="task"`` or ``"none"``), ``filters``, ``inner_steps`` (T, default 5),
    ``inner_lr`` (initial η; default 0.1 for classification, 0.01 for regression, whose
    unnormalised features make the squared loss stiffer; learned as η = exp(log_eta) for
    ``bilevel``, frozen otherwise), ``eval_steps``, ``hypergrad`` (default ``Reverse()`` for
    ``bilevel``; ``NoInner()`` — the only accepted value — for ``approx``/``classic``),
    ``variant`` and ``l2`` (ridge penalty (l2/2)·‖W^j‖² on each ground problem; default 0 as
    the paper; implicit strategies need l2 > 0).

    Reference: Franceschi et al. (2018), §3 ("learning meta-representations"), §4, App. A.
    """

    Config = HyperReprConfig

    def __init__(self, *, example_shape: Sequence[int], ways: int | None, config: Any = None, **options: Any) -> None:
        super().__init__(example_shape=example_shape, ways=ways, config=config, **options)
        c = self.config
        self.task = "regression" if ways is None else "classification"
        self.h = make_network(c.backbone, example_shape, ways, c.network_options(), head=False)
        buffers = [k for k, _ in self.h.named_buffers()]
        if buffers:
            raise OptionError("backbone", f"the representation must be pure (bn='task' or 'none'); it has buffers {buffers}")
        self.inner_steps = c.inner_steps
        self.eval_steps = c.eval_steps if c.eval_steps is not None else c.inner_steps
        self.variant = c.variant
        self.l2 = c.l2
        self.strategy: Strategy = NoInner() if c.variant != "bilevel" else (c.hypergrad or bl.Reverse())
        eta0 = c.inner_lr if c.inner_lr is not None else (0.1 if ways is not None else 0.01)
        self.log_eta = nn.Parameter(torch.tensor(math.log(eta0)), requires_grad=c.variant == "bilevel")
        self.problem = bl.BilevelProblem(self.inner_loss, self.inner_loss)

    # -- the batched ground problems ----------------------------------------------------------
    def features(self, x: Tensor) -> Tensor:
        """h(x) for B episodes at once: [B, n, *example_shape] -> [B, n, d]
        (:func:`learners.common.episode_features`)."""
        return episode_features(self.h, x)

    @staticmethod
    def ground_predict(params: dict[str, Tensor], features: Tensor) -> Tensor:
        """g^j(z) = z W^j + b^j for every episode: features [B, n, d] -> [B, n, N]."""
        return features @ params["W"] + params["b"].unsqueeze(1)

    def inner_loss(self, params: dict[str, Tensor], hparams: dict[str, Tensor], targets: Tensor) -> Tensor:
        """Σ_j [mean_i ℓ(g^j(z_i^j), y_i^j) + (l2/2)‖W^j‖²] with z = ``hparams["features"]``."""
        loss = summed_task_losses(self.ground_predict(params, hparams["features"]), targets, self.task)
        if self.l2:
            loss = loss + 0.5 * self.l2 * (params["W"] ** 2).sum()
        return loss

    def fit_ground_models(self, features: Tensor, targets: Tensor, steps: int, strategy: Strategy | None = None) -> dict[str, Tensor]:
        """(W_T, b_T) of the B ground models trained from 0 on (features [B, n, d], targets).

        Returns ``{"W": [B, d, N], "b": [B, N]}`` (N = max label + 1, or the regression output
        width), differentiable w.r.t. the features and η as ``strategy`` (default the learner's)
        says.
        """
        strategy = self.strategy if strategy is None else strategy
        b, _, d = features.shape
        out = int(targets.max()) + 1 if self.task == "classification" else targets.shape[-1]
        params0 = {"W": features.new_zeros(b, d, out), "b": features.new_zeros(b, out)}
        feats = features.detach() if isinstance(strategy, Forward) else features
        hparams = {"features": feats, "log_eta": self.log_eta}
        return bl.solve(self.problem, params0, hparams, targets, dynamics=bl.GradientDescent(lr=_eta), steps=steps,
                        hypergrad=strategy)

    def forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *, train: bool = True) -> Tensor:
        w = self.fit_ground_models(self.features(support_x), support_y, self.inner_steps if train else self.eval_steps)
        return self.ground_predict(w, self.features(query_x))

    def meta_loss(self, episodes: Episodes, *, train: bool = True) -> tuple[Tensor, Tensor]:
        """The variant's training objective (``classic``: training error on support ∪ query)."""
        if not (train and self.variant == "classic"):
            return super().meta_loss(episodes, train=train)
        x = torch.cat([episodes.support_x, episodes.query_x], dim=1)
        y = torch.cat([episodes.support_y, episodes.query_y], dim=1)
        z = self.features(x)
        pred = self.ground_predict(self.fit_ground_models(z, y, self.inner_steps), z)
        return self.query_loss(pred, y).mean(), self.metric(pred, y)


def _eta(hparams: dict[str, Tensor]) -> Tensor:
    return hparams["log_eta"].exp()


__all__ = ["VARIANTS", "HyperRepr", "HyperReprConfig"]
