"""Meta-SGD: Learning to Learn Quickly for Few-Shot Learning (Li, Zhou, Chen, Li 2017).

Both the initialisation θ = w_0 and a step size α_k for every coordinate of every parameter
(same shapes as the weights: a learned learning rate *and* update direction, since the α's may
turn negative) are outer variables. The inner dynamics is elementwise gradient descent,
:class:`bilevel.GradientDescent` with ``lr`` read from the hparams, so every hypergradient
strategy (Reverse, FirstOrder, Forward, ...) differentiates the α's.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

import bilevel as bl
from learners.common import GradientLearner, StepSizeConfig, param_key, per_parameter

ALPHA = "alpha."


class MetaSGD(GradientLearner):
    """Meta-SGD (Li et al. 2017): learned initialisation and elementwise step sizes.

    Algorithm 1: w_t = w_{t−1} − α ⊙ ∇L_support(w_{t−1}), w_0 = θ.

    Invariant: the hparams are ``{"alpha.<param name>": α}`` with α of the parameter's shape,
    initialised to ``inner_lr`` everywhere; with α ≡ ``inner_lr`` the inner loop is exactly
    MAML's. The meta-loss gradient reaches θ and α (second order by default; with
    ``hypergrad="first-order"`` the inner gradients are constants but α still gets
    d w_T/dα = −Σ_t g_t).

    Options: :class:`learners.common.StepSizeConfig` (``inner_lr`` is the initial α).

    Attributes:
        alpha: ``nn.ParameterDict`` keyed by :func:`learners.common.param_key` of each weight.
    """

    Config = StepSizeConfig

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.alpha = per_parameter(self.net, lambda _k, p: torch.full_like(p, self.config.inner_lr))
        self._names = [k for k, _ in self.net.named_parameters()]

    def hparams(self) -> dict[str, Tensor]:
        return {ALPHA + k: self.alpha[param_key(k)] for k in self._names}

    def dynamics(self) -> bl.Dynamics:
        names = self._names
        return bl.GradientDescent(lr=lambda h: {k: h[ALPHA + k] for k in names})


__all__ = ["MetaSGD"]
