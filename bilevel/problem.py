"""The bilevel problem: an inner objective L(w, λ) and an outer objective E(w, λ)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from bilevel._tree import Params

Loss = Callable[[Params, Params, Any], Tensor]


@dataclass(frozen=True)
class BilevelProblem:
    """A bilevel problem in the form of Franceschi et al. (2018), eq. (1.1)–(1.4).

    The inner problem trains ``params`` (w) on ``inner_loss`` L(w, λ); the outer problem
    chooses ``hparams`` (λ) to minimise f(λ) = E(w_T(λ), λ), the ``outer_loss`` at the last
    iterate of the inner dynamics w_t = Φ_t(w_{t-1}, λ) (see :func:`bilevel.solve`).

    Both losses are plain functions ``loss(params, hparams, batch) -> scalar tensor`` where
    ``params`` and ``hparams`` are dicts of tensors and ``batch`` is whatever the caller passes
    (a tuple of tensors, a dict, …). Use ``torch.func.functional_call(module, params, x)`` to
    evaluate an ``nn.Module`` with the given params; never mutate the module.

    Args:
        inner_loss: L(params, hparams, batch) -> scalar; the objective of the inner dynamics.
        outer_loss: E(params, hparams, batch) -> scalar; the objective whose gradient with respect
            to ``hparams`` (and ``params0``) is the hypergradient.

    Reference:
        L. Franceschi, P. Frasconi, M. Donini, M. Pontil. *A Bridge Between Hyperparameter
        Optimization and Learning-to-learn*, 2018, §1.
    """

    inner_loss: Loss
    outer_loss: Loss

    def __post_init__(self) -> None:
        for name in ("inner_loss", "outer_loss"):
            fn = getattr(self, name)
            if not callable(fn):
                raise TypeError(f"BilevelProblem.{name} must be callable (params, hparams, batch) -> scalar, got {type(fn).__name__}")


__all__ = ["BilevelProblem", "Loss"]
