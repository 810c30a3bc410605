"""MAML: Model-Agnostic Meta-Learning (Finn, Abbeel, Levine 2017).

The outer variable is the initialisation θ = w_0; the inner dynamics is T steps of gradient
descent with a fixed step size α on the support loss; the meta-loss is the query loss at w_T.
Second order by default (``hypergrad="reverse"``); first-order MAML with
``hypergrad="first-order"`` (:class:`bilevel.FirstOrder`).
"""
from __future__ import annotations

import bilevel as bl
from learners.common import GradientLearner


class MAML(GradientLearner):
    """MAML (Finn et al. 2017, Algorithm 2): w_t = w_{t−1} − α ∇L_support(w_{t−1}), w_0 = θ.

    See :class:`learners.common.GradientLearner` for the arguments; the test-time number of
    steps (``eval_steps``) may differ from the training one (``inner_steps``).
    """

    def dynamics(self) -> bl.Dynamics:
        return bl.GradientDescent(lr=self.inner_lr)


__all__ = ["MAML"]
