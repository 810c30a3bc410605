"""iMAML: Meta-Learning with Implicit Gradients (Rajeswaran, Finn, Kakade, Levine 2019).

The outer variable is θ, the centre of a proximal inner problem solved on each task's support
set (eq. (4)):

    φ*(θ) = argmin_φ  G(φ, θ) = L_support(φ) + (λ/2)‖φ − θ‖²,

from φ_0 = θ by T steps of gradient descent (or Adam). θ enters the inner problem only through
the proximal term, so it is an *hparam* of :func:`bilevel.solve` (w_0 is a constant copy of
it) and the implicit function theorem on ∇_φ G = ∇L_support(φ) + λ(φ − θ) = 0 gives the
meta-gradient of the query loss E (Lemma 1):

    dE(φ*)/dθ = (I + H/λ)⁻¹ ∇_φ E(φ*),   H = ∇²L_support(φ*),

which :class:`bilevel.Implicit` computes with a few conjugate-gradient steps on (H + λI)
(Hessian-vector products only). Nothing of the inner run is recorded, so the memory does not
grow with the number of inner steps T. The result is exact when φ_T solves the inner problem:
:class:`bilevel.Implicit` reports an inner solve or a linear solve that is not accurate.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

import bilevel as bl
from bilevel.options import OptionError, option
from learners.common import GradientLearner, StepSizeConfig

INNER_OPTIMIZERS = ("gd", "adam")


@dataclass(frozen=True)
class IMAMLConfig(StepSizeConfig):
    """iMAML's options: the proximal strength λ, the inner solver and the implicit strategy."""

    inner_steps: int = option(35, help="Inner steps T on the proximal problem at training time (its solution, not "
                              "the path, is differentiated: memory does not grow with T).", min=1,
                              paper="Rajeswaran et al. 2019 (code): 16 on Omniglot; 35 here: (1 − αλ)^T ≤ 10⁻³")
    inner_lr: float = option(0.1, help="Inner step size α of the proximal problem (fixed; may differ at test time).",
                             min=0, min_open=True, eval=True, paper="Rajeswaran et al. 2019 (code): 0.1 (Omniglot)")
    lam: float = option(2.0, help="Proximal strength λ of L_support(φ) + λ/2·‖φ − θ‖² (train and test).", min=0,
                        min_open=True, eval=True, paper="Rajeswaran et al. 2019 (code): 2.0 on Omniglot")
    inner_optimizer: str = option("gd", help="Inner solver: gd (iMAML-GD) or adam.", choices=INNER_OPTIMIZERS)
    hypergrad: bl.Strategy = option(bl.Implicit(bl.CG(maxiter=20)),
                                    help="implicit-cg:K (the method: K conjugate-gradient steps on (I + H/λ)), any "
                                    "other implicit-…, or reverse / checkpointed:K (exact derivative of the unrolled "
                                    "proximal solve, memory growing with T: a check).",
                                    paper="Rajeswaran et al. 2019 (code): 5 CG steps; 20 here")

    def check_hypergrad(self) -> None:
        """Only implicit strategies (the method) and exact unrolled ones (a check) are meaningful."""
        if isinstance(self.hypergrad, (bl.Implicit, bl.Reverse, bl.Checkpointed)):
            return
        why = {
            bl.FirstOrder: "treats the inner gradients as constants, so dφ_T/dθ keeps only the proximal pull "
                           "(a multiple of I), not (I + H/λ)⁻¹",
            bl.Truncated: "differentiates the last K steps only (for a Neumann-series approximation use "
                          "implicit-neumann:K)",
            bl.NoInner: "gives θ no meta-gradient at all",
            bl.Forward: "would carry one tangent per weight of the network (θ is the hparams)",
        }.get(type(self.hypergrad), "is not an implicit strategy")
        raise OptionError("hypergrad", f"iMAML: hypergrad={self.hypergrad!r} {why}. Use implicit-cg:K (the method), "
                          "another implicit-… form, or reverse / checkpointed:K to check it by unrolling")


class IMAML(GradientLearner):
    """iMAML (Rajeswaran et al. 2019): a learned proximal centre θ, meta-gradient by implicit differentiation.

    Per task, φ_T ≈ argmin_φ L_support(φ) + (λ/2)‖φ − θ‖² after T steps of GD/Adam from
    φ_0 = θ; the query loss at φ_T is the meta-loss. With ``hypergrad=implicit-cg:K`` (default
    K = 20) its gradient is (I + H/λ)⁻¹ ∇E(φ_T), H the support-loss Hessian at φ_T (Lemma 1,
    Algorithm 2), computed by :class:`bilevel.Implicit` with K CG steps on H + λI.

    Invariant: ``hparams()`` is θ (the network's parameters, keyed by parameter name) and
    ``initial_params()`` a constant copy of θ, so the implicit strategy differentiates the
    proximal condition ∇L_support(φ) + λ(φ − θ) = 0 (−∂F/∂θ = λI) and nothing depends on the
    inner trajectory. With ``hypergrad=reverse`` the gradient is the exact derivative of the
    unrolled φ_T instead (equal to the implicit one once the inner problem is solved).

    Options (:class:`IMAMLConfig`): ``lam`` (λ = 2) and ``inner_lr`` (α = 0.1) as the paper's
    Omniglot runs, and ``inner_steps`` T = 35 so that the proximal part of the inner problem is
    solved: gradient descent contracts it by (1 − αλ)^T = 0.8^35 ≈ 4·10⁻⁴ (the paper's 16 steps
    leave 2.8 % of the initial gradient), so on a convex inner problem whose support-loss
    Hessian H satisfies α(λ + ‖H‖) < 2 the defaults pass the certificate of
    :class:`bilevel.Implicit` (relative optimality and CG residuals ≤ 10⁻³). A ReLU network
    with BatchNorm (Conv-4 on Omniglot) is another matter: its support loss is non-smooth and
    non-convex (at initialisation H has eigenvalues near −66 on 5-way 1-shot), gradient descent
    stalls at 10–20 % of the initial gradient for any step size and T ≤ 400, and CG meets
    negative curvature — the certificate says so (once per run; ``log.csv`` records the
    residuals), and the meta-gradient is then the approximation the paper's method computes in
    practice. ``inner_optimizer`` (gd or adam), ``eval_steps``, ``hypergrad`` (default
    ``implicit-cg:20``; with ``batch_tasks`` the CG runs on the block-diagonal system of the B
    tasks: the same solution, more iterations to reach it), and the backbone options of
    :class:`learners.common.GradientConfig`.
    """

    Config = IMAMLConfig

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lam = self.config.lam

    def dynamics(self) -> bl.Dynamics:
        lr = self.config.inner_lr
        return bl.Adam(lr=lr) if self.config.inner_optimizer == "adam" else bl.GradientDescent(lr=lr)

    def hparams(self) -> dict[str, Tensor]:
        """θ, the proximal centre (the outer variable)."""
        return dict(self.net.named_parameters())

    def initial_params(self) -> dict[str, Tensor]:
        """φ_0 = θ as a constant: θ reaches φ* through the proximal term only."""
        return {k: v.detach() for k, v in self.net.named_parameters()}

    def proximal(self, params: dict[str, Tensor], hparams: dict[str, Tensor]) -> Tensor:
        """(λ/2) Σ ‖φ − θ‖², summed over the tasks when ``params`` are stacked [B, ...]."""
        return 0.5 * self.lam * sum(((params[k] - hparams[k]) ** 2).sum() for k in params)

    def task_loss(self, params: dict[str, Tensor], hparams: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
        """G(φ, θ) = L_support(φ) + (λ/2)‖φ − θ‖² on one task."""
        return super().task_loss(params, hparams, batch) + self.proximal(params, hparams)

    def tasks_loss(self, params: dict[str, Tensor], hparams: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
        """Σ_j G(φ_j, θ) over B tasks with stacked params [B, ...] (block-diagonal in the φ_j)."""
        return super().tasks_loss(params, hparams, batch) + self.proximal(params, hparams)


__all__ = ["INNER_OPTIMIZERS", "IMAML", "IMAMLConfig"]
