"""MAML: Model-Agnostic Meta-Learning (Finn, Abbeel, Levine 2017).

The outer variable is the initialisation θ = w_0; the inner dynamics is T steps of gradient
descent with a fixed step size α on the support loss; the meta-loss is the query loss at w_T.
Second order by default (``hypergrad="reverse"``); first-order MAML with
``hypergrad="first-order"`` (:class:`bilevel.FirstOrder`).
"""
from __future__ import annotations

from dataclasses import dataclass

import bilevel as bl
from bilevel.options import option
from learners.common import GradientLearner, StepSizeConfig


@dataclass(frozen=True)
class MAMLConfig(StepSizeConfig):
    """MAML's options: the fixed inner step size may be changed at test time."""

    inner_lr: float = option(0.4, help="Inner step size α (fixed; may differ at test time).", min=0, min_open=True,
                             eval=True, paper="Finn et al. 2017: 0.4 (Omniglot), 0.01 (sinusoid)")


class MAML(GradientLearner):
    """MAML (Finn et al. 2017): a learned initialisation adapted by gradient descent.

    w_t = w_{t−1} − α ∇L_support(w_{t−1}), w_0 = θ (Algorithm 2). Options: :class:`MAMLConfig`
    (see :class:`learners.common.GradientConfig`); the test-time number of steps
    (``eval_steps``) may differ from the training one (``inner_steps``).
    """

    Config = MAMLConfig

    def dynamics(self) -> bl.Dynamics:
        return bl.GradientDescent(lr=self.config.inner_lr)


__all__ = ["MAML", "MAMLConfig"]
