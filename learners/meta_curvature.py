"""Meta-Curvature (Park & Oliva, NeurIPS 2019).

MAML whose inner gradient is transformed, layer by layer, by meta-learned matrices that play
the role of a (Kronecker-factored) curvature: w_t = w_{t−1} − α MC(∇L(w_{t−1}); M). For a
convolution weight ∇ ∈ R^{C_out × C_in × k × k}, seen as a 3-way tensor
[C_out, C_in, k²],

    MC(∇) = ∇ ×₃ M_f ×₂ M_i ×₁ M_o,   M_o ∈ R^{C_out×C_out}, M_i ∈ R^{C_in×C_in}, M_f ∈ R^{k²×k²},

where (A ×_n M) multiplies mode n of A by M: (A ×₁ M)_{o i f} = Σ_{o'} M_{o o'} A_{o' i f}.
For a linear weight [out, in] this is ∇ ×₂ M_i ×₁ M_o = M_o ∇ M_iᵀ, and for a vector
(bias, BatchNorm scale/shift) M_b ∇. All matrices start at the identity, where the method is
MAML, and are meta-learned with the initialisation θ.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import bilevel as bl
from bilevel.dynamics import GDState
from bilevel.options import option
from learners.common import GradientLearner, StepSizeConfig, param_key

# which matrices a parameter of a given rank gets (the mode they multiply, in order of application)
FACTORS: dict[int, tuple[str, ...]] = {4: ("f", "i", "o"), 2: ("i", "o"), 1: ("b",)}


def curvature_factors(shape: torch.Size | tuple[int, ...]) -> dict[str, int]:
    """Sizes of the Meta-Curvature matrices of a parameter of shape ``shape``.

    Returns ``{"o": C_out, "i": C_in, "f": k²}`` for [C_out, C_in, k, k] convolutions,
    ``{"o": out, "i": in}`` for [out, in] linear weights, ``{"b": n}`` for [n] vectors.

    Raises:
        ValueError: for other ranks.
    """
    shape = tuple(shape)
    if len(shape) == 4:
        return {"o": shape[0], "i": shape[1], "f": shape[2] * shape[3]}
    if len(shape) == 2:
        return {"o": shape[0], "i": shape[1]}
    if len(shape) == 1:
        return {"b": shape[0]}
    raise ValueError(f"Meta-Curvature handles conv [C_out, C_in, k, k], linear [out, in] and vector parameters; got shape {list(shape)}")


def curvature_transform(grad: Tensor, mats: dict[str, Tensor]) -> Tensor:
    """MC(∇; M): the mode products of Park & Oliva (2019), eq. (4)–(5), for one parameter.

    Args:
        grad: ∇ of shape [..., C_out, C_in, k, k], [..., out, in] or [..., n] (leading dimensions,
            e.g. a task dimension, are batched over).
        mats: ``{"o", "i", "f"}`` (conv), ``{"o", "i"}`` (linear) or ``{"b"}`` (vector), square
            matrices of the sizes given by :func:`curvature_factors`.

    Returns:
        ∇ ×₃ M_f ×₂ M_i ×₁ M_o (conv), M_o ∇ M_iᵀ (linear) or M_b ∇ (vector); shape of ``grad``.
    """
    if "f" in mats:  # conv [..., C_out, C_in, k, k]
        o, i, kh, kw = grad.shape[-4:]
        g = grad.reshape(*grad.shape[:-4], o, i, kh * kw)
        g = g @ mats["f"].T  # ×₃ M_f (pairwise contractions: never form an outer product of the M's)
        g = torch.einsum("qi,...oir->...oqr", mats["i"], g)  # ×₂ M_i
        g = torch.einsum("po,...oqr->...pqr", mats["o"], g)  # ×₁ M_o
        return g.reshape(grad.shape)
    if "o" in mats:  # linear [..., out, in]
        return torch.einsum("po,...oi->...pi", mats["o"], grad) @ mats["i"].T
    if "b" in mats:  # vector [..., n]
        return torch.einsum("po,...o->...p", mats["b"], grad)
    raise ValueError(f"curvature_transform: unsupported gradient shape {list(grad.shape)}")


class CurvatureDescent(bl.Dynamics):
    """Φ of Meta-Curvature: w_t = w_{t−1} − α MC(g_t; M), with the M's read from the hparams.

    Invariant: the state is :class:`bilevel.dynamics.GDState` (w_t only); the matrices of
    parameter ``k`` are ``hparams[f"{k}.M_{x}"]`` for x in :func:`curvature_factors`, so every
    hypergradient strategy differentiates them. With identity matrices this is
    ``GradientDescent(lr)``.

    Args:
        lr: the fixed inner step size α.
        shapes: ``{param name: shape}`` of the parameters it updates.
    """

    def __init__(self, lr: float, shapes: dict[str, tuple[int, ...]]) -> None:
        self.lr = float(lr)
        self.factors = {k: curvature_factors(s) for k, s in shapes.items()}

    def init(self, params: dict[str, Tensor], hparams: dict[str, Tensor]) -> GDState:
        return GDState(dict(params))

    def step(self, state: GDState, grads: dict[str, Tensor], hparams: dict[str, Tensor], *, t: int, loss: Tensor) -> GDState:
        w = state.params
        out = {}
        for k, v in w.items():
            mats = {x: hparams[f"{k}.M_{x}"] for x in self.factors[k]}
            out[k] = v - self.lr * curvature_transform(grads[k], mats)
        return GDState(out)


@dataclass(frozen=True)
class MetaCurvatureConfig(StepSizeConfig):
    """Meta-Curvature's options: the fixed inner step size may be changed at test time."""

    inner_lr: float = option(0.4, help="Inner step size α (fixed; may differ at test time).", min=0, min_open=True,
                             eval=True)


class MetaCurvature(GradientLearner):
    """Meta-Curvature (Park & Oliva 2019): gradients transformed by learned curvature matrices.

    w_t = w_{t−1} − α MC(∇L_support(w_{t−1}); M), w_0 = θ.

    Invariant: with every M the identity (the initial value) the inner loop, and hence the
    meta-gradient w.r.t. θ, is MAML's exactly; the meta-loss gradient reaches θ and every M.

    Options: :class:`MetaCurvatureConfig` (``inner_lr`` is the fixed α).

    Attributes:
        curvature: ``nn.ModuleDict`` {param_key(name): ParameterDict {"o","i","f"} | {"o","i"} | {"b"}}.
            The input matrix of a linear head sees all its features (e.g. 1600×1600 for Conv-4
            at 84×84).
    """

    Config = MetaCurvatureConfig

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._shapes = {k: tuple(p.shape) for k, p in self.net.named_parameters()}
        self.curvature = nn.ModuleDict({
            param_key(k): nn.ParameterDict({x: nn.Parameter(torch.eye(n, dtype=p.dtype)) for x, n in curvature_factors(p.shape).items()})
            for k, p in self.net.named_parameters()
        })

    def hparams(self) -> dict[str, Tensor]:
        return {f"{k}.M_{x}": m for k in self._shapes for x, m in self.curvature[param_key(k)].items()}

    def dynamics(self) -> bl.Dynamics:
        return CurvatureDescent(self.config.inner_lr, self._shapes)


__all__ = ["CurvatureDescent", "MetaCurvature", "MetaCurvatureConfig", "curvature_factors", "curvature_transform"]
