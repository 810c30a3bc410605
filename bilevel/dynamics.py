"""Inner dynamics Φ: pure ``init``/``step`` pairs with explicit state.

A dynamics maps the state s_{t-1} to s_t = Φ_t(s_{t-1}, λ) given the inner gradient
g_t = ∇_w L(w_{t-1}, λ, B_t) (Franceschi et al. 2018, eq. (1.3)–(1.4)). The state is a pytree
of tensors (a NamedTuple of dicts) whose ``params`` field is w_t; auxiliary variables (momentum,
Adam moments) live next to it, as s_t = (w_t, v_t) in the paper. Nothing is stored on the
dynamics object between calls.

Every coefficient (learning rate, momentum, β's, …) may be

* a number or a tensor, used for every parameter;
* a dict ``{param_key: number | tensor}`` giving per-parameter (possibly elementwise) values,
  whose tensors must broadcast to the shape of that parameter (Meta-SGD's step sizes);
* a function ``f(hparams)`` or ``f(hparams, t)`` returning either of the above, so that
  hyperparameters of the dynamics receive hypergradients (learning-rate and momentum tuning in
  Franceschi et al. 2017; per-step schedules use ``t``). Steps are numbered t = 1, …, T.

Put tensors you want hypergradients for in ``hparams`` and read them with a function: the
Forward and Implicit strategies differentiate with respect to ``hparams`` only, not with
respect to tensors captured by a closure.

Writing your own dynamics: subclass :class:`Dynamics` (or provide any object with the same
``init``/``step``/``params`` methods). ``step`` must be a pure function of its inputs built from
differentiable torch operations, so that every hypergradient strategy (including forward mode,
which runs it under ``torch.func.jvp``/``vmap``) applies. State leaves must be tensors.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Union

import torch
from torch import Tensor

from bilevel._tree import Params

Coefficient = Union[float, Tensor, Mapping[str, Union[float, Tensor]], Callable[..., Any]]


def _arity(fn: Callable[..., Any]) -> int:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return 1
    positional = [
        p
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values()):
        return 2
    return len(positional)


class _Coef:
    """A resolved-at-each-step coefficient (see the module docstring for accepted forms)."""

    def __init__(self, value: Coefficient, name: str) -> None:
        if isinstance(value, bool) or value is None:
            raise TypeError(f"{name} must be a number, tensor, dict or function of hparams, got {value!r}")
        if not isinstance(value, (int, float, Tensor, Mapping)) and not callable(value):
            raise TypeError(f"{name} must be a number, tensor, dict or function of hparams, got {type(value).__name__}")
        self.value = value
        self.name = name
        self.arity = _arity(value) if callable(value) and not isinstance(value, Tensor) else 0
        if callable(value) and not isinstance(value, Tensor) and self.arity not in (1, 2):
            raise TypeError(
                f"{name}: a coefficient function must take (hparams) or (hparams, t), "
                f"got a function with {self.arity} required positional arguments"
            )

    def __call__(self, hparams: Params, t: int, params: Params) -> dict[str, Any]:
        v = self.value
        if callable(v) and not isinstance(v, Tensor):
            v = v(hparams) if self.arity == 1 else v(hparams, t)
        if isinstance(v, Mapping):
            missing = [k for k in params if k not in v]
            extra = [k for k in v if k not in params]
            if missing or extra:
                raise ValueError(
                    f"{self.name} dict has keys that do not match params at step {t}: "
                    f"missing {missing}, unexpected {extra}"
                )
            out = dict(v)
        elif isinstance(v, (int, float, Tensor)) and not isinstance(v, bool):
            out = {k: v for k in params}
        else:
            raise TypeError(f"{self.name} evaluated to {type(v).__name__} at step {t}; expected a number, tensor or dict")
        for k, c in out.items():
            if isinstance(c, Tensor):
                p = params[k]
                try:
                    ok = torch.broadcast_shapes(c.shape, p.shape) == p.shape
                except RuntimeError:
                    ok = False
                if not ok:
                    raise ValueError(
                        f"{self.name}[{k!r}] has shape {list(c.shape)}, which does not broadcast to "
                        f"params[{k!r}] of shape {list(p.shape)} (step {t})"
                    )
            elif not isinstance(c, (int, float)) or isinstance(c, bool):
                raise TypeError(f"{self.name}[{k!r}] must be a number or tensor, got {type(c).__name__}")
        return out


class Dynamics:
    """Base class for inner dynamics Φ: a pure ``init``/``step`` pair with explicit state.

    Invariant: ``s_0 = init(params0, hparams)`` and ``s_t = step(s_{t-1}, g_t, hparams, t=t,
    loss=L_t)`` with ``g_t = ∇_w L(w_{t-1}, λ, B_t)`` and ``L_t`` its value, where
    ``w_t = params(s_t)``. The hypergradient strategy decides how ``g_t`` is computed
    (differentiably, as a constant, or under forward mode) — the dynamics never calls autograd.

    Reference: Franceschi et al. (2018), eq. (1.3)–(1.4).
    """

    def init(self, params: Params, hparams: Params) -> Any:
        """Initial state s_0 built from ``params`` (w_0) and ``hparams``."""
        raise NotImplementedError

    def step(self, state: Any, grads: Params, hparams: Params, *, t: int, loss: Tensor) -> Any:
        """One step s_t = Φ_t(s_{t-1}, λ). ``t`` runs from 1 to T."""
        raise NotImplementedError

    def params(self, state: Any) -> Params:
        """The model parameters w_t held in state s_t."""
        if hasattr(state, "params"):
            return state.params
        if isinstance(state, Mapping):
            return state  # type: ignore[return-value]
        raise TypeError(
            f"{type(self).__name__}.params(state): cannot find params in a {type(state).__name__}; "
            "give the state a `params` field or override Dynamics.params"
        )


class GDState(NamedTuple):
    """State of :class:`GradientDescent`: s_t = w_t."""

    params: Params


class GradientDescent(Dynamics):
    """Gradient descent: w_t = w_{t-1} − η_t ⊙ ∇_w L(w_{t-1}, λ).

    Args:
        lr: the step size η (number, tensor, per-parameter dict, or function of hparams[, t]);
            elementwise step sizes give Meta-SGD (Li et al. 2017).

    Reference: Franceschi et al. (2018), eq. (2.1).
    """

    def __init__(self, lr: Coefficient) -> None:
        self.lr = _Coef(lr, "lr")

    def init(self, params: Params, hparams: Params) -> GDState:
        return GDState(dict(params))

    def step(self, state: GDState, grads: Params, hparams: Params, *, t: int, loss: Tensor) -> GDState:
        w = state.params
        lr = self.lr(hparams, t, w)
        return GDState({k: w[k] - lr[k] * grads[k] for k in w})


class HeavyBallState(NamedTuple):
    """State of :class:`HeavyBall`: s_t = (w_t, v_t)."""

    params: Params
    velocity: Params


class HeavyBall(Dynamics):
    """Gradient descent with (heavy-ball) momentum, state s_t = (w_t, v_t).

    v_t = μ v_{t-1} + ∇_w L(w_{t-1}, λ),  w_t = w_{t-1} − η v_t   (v_0 = 0);
    with ``nesterov=True``: w_t = w_{t-1} − η (∇_w L(w_{t-1}, λ) + μ v_t).

    Args:
        lr: the step size η (any coefficient form, see module docstring).
        momentum: μ (any coefficient form).
        nesterov: use Nesterov's look-ahead form (as ``torch.optim.SGD(nesterov=True)``).

    Reference: Franceschi, Donini, Frasconi, Pontil (2017), *Forward and Reverse Gradient-Based
    Hyperparameter Optimization*, §2 (momentum dynamics).
    """

    def __init__(self, lr: Coefficient, momentum: Coefficient = 0.9, *, nesterov: bool = False) -> None:
        self.lr = _Coef(lr, "lr")
        self.momentum = _Coef(momentum, "momentum")
        self.nesterov = bool(nesterov)

    def init(self, params: Params, hparams: Params) -> HeavyBallState:
        return HeavyBallState(dict(params), {k: torch.zeros_like(v) for k, v in params.items()})

    def step(self, state: HeavyBallState, grads: Params, hparams: Params, *, t: int, loss: Tensor) -> HeavyBallState:
        w, v = state.params, state.velocity
        lr = self.lr(hparams, t, w)
        mu = self.momentum(hparams, t, w)
        v_new = {k: mu[k] * v[k] + grads[k] for k in w}
        if self.nesterov:
            direction = {k: grads[k] + mu[k] * v_new[k] for k in w}
        else:
            direction = v_new
        return HeavyBallState({k: w[k] - lr[k] * direction[k] for k in w}, v_new)


class AdamState(NamedTuple):
    """State of :class:`Adam`: s_t = (w_t, m_t, v_t); the step count is t itself."""

    params: Params
    mu: Params
    nu: Params


class Adam(Dynamics):
    """Adam (Kingma & Ba 2015) as differentiable dynamics, s_t = (w_t, m_t, v_t).

    m_t = β1 m_{t-1} + (1−β1) g_t,  v_t = β2 v_{t-1} + (1−β2) g_t²,
    w_t = w_{t-1} − η m̂_t / (sqrt(v̂_t + ε_root) + ε),  m̂_t = m_t/(1−β1^t), v̂_t = v_t/(1−β2^t).

    ``eps_root`` > 0 keeps the derivative of the square root finite where a gradient entry is
    exactly zero (with ε_root = 0, reverse-mode hypergradients through Adam are NaN there, as in
    torchopt's default). Set it to 0 to reproduce ``torch.optim.Adam`` bit for bit.

    Args:
        lr: step size η; b1, b2: β1, β2; eps: ε; eps_root: ε_root (all any coefficient form
            except ``eps_root``, a float).
    """

    def __init__(
        self,
        lr: Coefficient,
        b1: Coefficient = 0.9,
        b2: Coefficient = 0.999,
        eps: Coefficient = 1e-8,
        *,
        eps_root: float = 1e-16,
    ) -> None:
        self.lr = _Coef(lr, "lr")
        self.b1 = _Coef(b1, "b1")
        self.b2 = _Coef(b2, "b2")
        self.eps = _Coef(eps, "eps")
        if eps_root < 0:
            raise ValueError(f"eps_root must be >= 0, got {eps_root}")
        self.eps_root = float(eps_root)

    def init(self, params: Params, hparams: Params) -> AdamState:
        z = {k: torch.zeros_like(v) for k, v in params.items()}
        return AdamState(dict(params), z, {k: torch.zeros_like(v) for k, v in params.items()})

    def step(self, state: AdamState, grads: Params, hparams: Params, *, t: int, loss: Tensor) -> AdamState:
        w, m, v = state
        lr, b1, b2, eps = (c(hparams, t, w) for c in (self.lr, self.b1, self.b2, self.eps))
        w_new, m_new, v_new = {}, {}, {}
        for k in w:
            g = grads[k]
            m_new[k] = b1[k] * m[k] + (1 - b1[k]) * g
            v_new[k] = b2[k] * v[k] + (1 - b2[k]) * g * g
            m_hat = m_new[k] / (1 - b1[k] ** t)
            v_hat = v_new[k] / (1 - b2[k] ** t)
            w_new[k] = w[k] - lr[k] * m_hat / (torch.sqrt(v_hat + self.eps_root) + eps[k])
        return AdamState(w_new, m_new, v_new)


__all__ = [
    "Adam",
    "AdamState",
    "Coefficient",
    "Dynamics",
    "GDState",
    "GradientDescent",
    "HeavyBall",
    "HeavyBallState",
]
