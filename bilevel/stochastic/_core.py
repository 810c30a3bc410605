"""Shared pieces of the stochastic bilevel solvers: batches, an explicit-state sampler,
step-size schedules and the oracle products (gradients, Hessian- and Jacobian-vector products).

Notation (Dagréou et al. 2022): the inner objective G(z, x) = (1/n) Σ_i G_i(z, x) is
``problem.inner_loss`` and the outer objective F(z, x) = (1/m) Σ_j F_j(z, x) is
``problem.outer_loss``; z = ``params`` (inner variable), x = ``hparams`` (outer variable). The value
function is h(x) = F(z*(x), x) with z*(x) = argmin_z G(z, x), and its gradient is
∇h(x) = ∇_x F(z*, x) + ∇²_{xz} G(z*, x) v*(x) with v*(x) = −[∇²_{zz} G(z*, x)]⁻¹ ∇_z F(z*, x).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from bilevel import _tree as T
from bilevel._tree import Params
from bilevel.problem import BilevelProblem


@dataclass(frozen=True)
class Batches:
    """A finite sum split into ``n`` mini-batches B_0 … B_{n−1}; ``get(i)`` returns B_i.

    Invariant: the full objective is Σ_i weight(i) · loss(·, ·, get(i)) with
    weight(i) = sizes[i] / Σ sizes (the mean over samples when each batch loss is a mean).

    Args:
        get: i -> the batch object handed to ``inner_loss``/``outer_loss`` (a slice, an index
            tensor, a tuple of tensors, a start offset …), for 0 ≤ i < n.
        n: number of batches (≥ 1).
        sizes: number of samples in each batch (default: all equal); only SABA's averages use it.
    """

    get: Callable[[int], Any]
    n: int
    sizes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not callable(self.get):
            raise TypeError(f"Batches(get=...) must be callable i -> batch, got {type(self.get).__name__}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"Batches(n=...) must be an integer >= 1, got {self.n!r}")
        if self.sizes is not None:
            if len(self.sizes) != self.n or any((not isinstance(s, int)) or s < 1 for s in self.sizes):
                raise ValueError(f"Batches(sizes=...) must hold n={self.n} positive integers, got {self.sizes!r}")

    def weight(self, i: int) -> float:
        """The weight of batch i in the full objective (1/n for equal batches)."""
        if self.sizes is None:
            return 1.0 / self.n
        return self.sizes[i] / sum(self.sizes)

    @staticmethod
    def contiguous(n_samples: int, batch_size: int, make: Callable[[slice], Any] | None = None) -> Batches:
        """Batches of ``batch_size`` consecutive samples (the last one may be smaller).

        Args:
            n_samples: number of samples N.
            batch_size: samples per batch (≥ 1); ``batch_size >= N`` gives one full batch.
            make: slice -> batch (default: the slice itself).

        Returns:
            ``Batches`` with n = ceil(N / batch_size) and B_i = make(slice(i·b, min((i+1)·b, N))).
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        b = min(batch_size, n_samples)
        n = (n_samples + b - 1) // b
        slices = [slice(i * b, min((i + 1) * b, n_samples)) for i in range(n)]
        items = [s if make is None else make(s) for s in slices]
        return Batches(items.__getitem__, n, tuple(s.stop - s.start for s in slices))


class SamplerState(NamedTuple):
    """Where a :class:`Sampler` stands: the current epoch's batch order and the position in it."""

    order: Tensor  # int64 [n] permutation of the batch indices (CPU)
    pos: int
    epoch: int
    seed: int


@dataclass(frozen=True)
class Sampler:
    """Batch indices drawn without replacement, reshuffled every epoch (explicit state).

    Invariant: within an epoch every index 0..n−1 is returned exactly once; the permutation of
    epoch e depends only on (seed, e), so a state can be replayed.
    (benchmark_bilevel's ``minibatch_sampler`` follows the same design.)
    """

    n: int

    def init(self, seed: int) -> SamplerState:
        """The state at the start of epoch 0 for ``seed``."""
        return SamplerState(self._perm(seed, 0), 0, 0, int(seed))

    def _perm(self, seed: int, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + epoch) % (2**63 - 1))
        return torch.randperm(self.n, generator=g)

    def next(self, state: SamplerState) -> tuple[int, SamplerState]:
        """Return (batch index, next state)."""
        if state.pos >= self.n:
            state = SamplerState(self._perm(state.seed, state.epoch + 1), 0, state.epoch + 1, state.seed)
        return int(state.order[state.pos]), state._replace(pos=state.pos + 1)


def draw(batches: Batches, state: SamplerState) -> tuple[int, Any, SamplerState]:
    """Draw the next batch: (index, batch, new sampler state)."""
    i, state = Sampler(batches.n).next(state)
    return i, batches.get(i), state


@dataclass(frozen=True)
class Schedule:
    """A decreasing step size  η_t = η₀ / (t + 1)^p  for t = 0, 1, 2, … (p = 0: constant).

    Args:
        base: η₀ > 0.
        power: p ≥ 0.
    """

    base: float
    power: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.base, (int, float)) or isinstance(self.base, bool) or not self.base > 0 or math.isinf(self.base):
            raise ValueError(f"step size must be a finite number > 0, got {self.base!r}")
        if not isinstance(self.power, (int, float)) or not self.power >= 0:
            raise ValueError(f"step-size decay exponent must be >= 0, got {self.power!r}")

    def __call__(self, t: int) -> float:
        return self.base / (t + 1) ** self.power if self.power else float(self.base)


def check_positive(name: str, value: Any, *, integer: bool = False) -> None:
    """Raise ``ValueError`` naming the option unless ``value`` is a finite number > 0 (an int ≥ 1)."""
    if integer:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


# ----------------------------------------------------------------------------- oracle products
def _leaf(d: Params) -> Params:
    return {k: v.detach().requires_grad_(True) for k, v in d.items()}


def _grads(out: Tensor | Sequence[Tensor], wrt: Params, grad_outputs: Any = None, *, create_graph: bool = False) -> Params:
    keys = list(wrt)
    got = torch.autograd.grad(out, [wrt[k] for k in keys], grad_outputs, create_graph=create_graph, allow_unused=True,
                              retain_graph=create_graph or None)
    return {k: (g if g is not None else torch.zeros_like(wrt[k])) for k, g in zip(keys, got)}


def _scalar(value: Any, name: str) -> Tensor:
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise ValueError(f"{name} must return a scalar tensor, got {type(value).__name__}"
                         f"{'' if not isinstance(value, Tensor) else ' of shape ' + str(list(value.shape))}")
    return value.reshape(())


class Oracles:
    """The mini-batch oracles a stochastic solver calls (base class; see :class:`AutogradOracles`).

    Every method evaluates one batch B (an object from :class:`Batches`) at (z, x) and returns
    dicts of tensors shaped like ``inner`` (z) or ``outer`` (x), without autograd history.
    Implement these five methods to plug in other oracles (e.g. JAX functions through DLPack,
    :mod:`bilevel.stochastic.benchopt`).
    """

    def inner_grad(self, inner: Params, outer: Params, batch: Any) -> Params:
        """∇_z G_B(z, x)."""
        raise NotImplementedError

    def inner_grad_both(self, inner: Params, outer: Params, batch: Any) -> tuple[Params, Params]:
        """(∇_z G_B(z, x), ∇_x G_B(z, x))."""
        raise NotImplementedError

    def outer_grads(self, inner: Params, outer: Params, batch: Any) -> tuple[Params, Params]:
        """(∇_z F_B(z, x), ∇_x F_B(z, x))."""
        raise NotImplementedError

    def hvp_cross(self, inner: Params, outer: Params, v: Params, batch: Any, *, with_grad: bool = True,
                  with_hvp: bool = True) -> tuple[Params | None, Params | None, Params]:
        """(∇_z G_B, ∇²_zz G_B · v, ∇²_xz G_B · v); ``None`` in place of the parts not asked for."""
        raise NotImplementedError

    def hvp(self, inner: Params, outer: Params, v: Params, batch: Any) -> Params:
        """∇²_zz G_B(z, x) · v."""
        return self.hvp_cross(inner, outer, v, batch, with_grad=False)[1]  # type: ignore[return-value]

    def cross_vjp(self, inner: Params, outer: Params, v: Params, batch: Any) -> Params:
        """∇²_xz G_B(z, x) · v = ∂_x ⟨∇_z G_B(z, x), v⟩ (shaped like ``outer``)."""
        return self.hvp_cross(inner, outer, v, batch, with_grad=False, with_hvp=False)[2]


@dataclass(frozen=True)
class AutogradOracles(Oracles):
    """The oracles of a :class:`bilevel.BilevelProblem` by torch autograd (never a dense Hessian).

    Gradients are one reverse pass; ∇²_zz G v and ∇²_xz G v come together from one double
    backward of ⟨∇_z G(z, x), v⟩ (Pearlmutter's trick), so a SOBA step costs two forward and three
    backward passes.
    """

    problem: BilevelProblem

    def __post_init__(self) -> None:
        check_problem(self.problem)

    def inner_grad(self, inner: Params, outer: Params, batch: Any) -> Params:
        with torch.enable_grad():
            z = _leaf(inner)
            return _grads(_scalar(self.problem.inner_loss(z, T.detach(outer), batch), "inner_loss"), z)

    def inner_grad_both(self, inner: Params, outer: Params, batch: Any) -> tuple[Params, Params]:
        with torch.enable_grad():
            z, x = _leaf(inner), _leaf(outer)
            g = _grads(_scalar(self.problem.inner_loss(z, x, batch), "inner_loss"), _join(z, x))
        return _split(g, z, x)

    def outer_grads(self, inner: Params, outer: Params, batch: Any) -> tuple[Params, Params]:
        with torch.enable_grad():
            z, x = _leaf(inner), _leaf(outer)
            g = _grads(_scalar(self.problem.outer_loss(z, x, batch), "outer_loss"), _join(z, x))
        return _split(g, z, x)

    def hvp_cross(self, inner: Params, outer: Params, v: Params, batch: Any, *, with_grad: bool = True,
                  with_hvp: bool = True) -> tuple[Params | None, Params | None, Params]:
        with torch.enable_grad():
            z, x = _leaf(inner), _leaf(outer)
            gz = _grads(_scalar(self.problem.inner_loss(z, x, batch), "inner_loss"), z, create_graph=True)
            keys = [k for k in gz if gz[k].requires_grad]
            wrt = _join(z, x) if with_hvp else {"x." + k: t for k, t in x.items()}
            if keys:
                prods = _grads([gz[k] for k in keys], wrt, [v[k].to(gz[k].dtype) for k in keys])
            else:  # the inner gradient is constant in (z, x): all second derivatives vanish
                prods = {k: torch.zeros_like(t) for k, t in wrt.items()}
        grad = {k: g.detach() for k, g in gz.items()} if with_grad else None
        hv = {k: prods["z." + k] for k in z} if with_hvp else None
        return grad, hv, {k: prods["x." + k] for k in x}

    def cross_jvp(self, inner: Params, outer: Params, u: Params, batch: Any) -> Params:
        """∇²_zx G_B(z, x) · u = d/dε ∇_z G_B(z, x + εu) at ε = 0 (shaped like ``inner``).

        The transpose of :meth:`cross_vjp`, by the double-backward trick (reverse mode only):
        the gradient in a dummy w of ⟨∂_x ⟨∇_z G, w⟩, u⟩.
        """
        with torch.enable_grad():
            z, x = _leaf(inner), _leaf(outer)
            gz = _grads(_scalar(self.problem.inner_loss(z, x, batch), "inner_loss"), z, create_graph=True)
            keys = [k for k in gz if gz[k].requires_grad]
            if not keys:
                return T.zeros_like(z)
            w = {k: torch.zeros_like(gz[k], requires_grad=True) for k in keys}
            gx = torch.autograd.grad([gz[k] for k in keys], [x[k] for k in x], [w[k] for k in keys], create_graph=True,
                                     allow_unused=True)
            pairs = [(g, u[k]) for k, g in zip(x, gx) if g is not None and g.requires_grad]
            if not pairs:
                return T.zeros_like(z)
            out = torch.autograd.grad([g for g, _ in pairs], [w[k] for k in keys], [uu for _, uu in pairs], allow_unused=True)
        res = dict(zip(keys, out))
        return {k: (res[k] if res.get(k) is not None else torch.zeros_like(z[k])) for k in z}


def _join(z: Params, x: Params) -> Params:
    return {**{"z." + k: t for k, t in z.items()}, **{"x." + k: t for k, t in x.items()}}


def _split(g: Params, z: Params, x: Params) -> tuple[Params, Params]:
    return {k: g["z." + k] for k in z}, {k: g["x." + k] for k in x}


def as_oracles(problem: BilevelProblem | Oracles) -> Oracles:
    """``problem`` itself when it is an :class:`Oracles`, else :class:`AutogradOracles` of it."""
    if isinstance(problem, Oracles):
        return problem
    if isinstance(problem, BilevelProblem):
        return AutogradOracles(problem)
    raise TypeError(f"problem must be a bilevel.BilevelProblem or a bilevel.stochastic.Oracles, got {type(problem).__name__}")


# ----------------------------------------------------------------------------- small helpers
def axpy(y: Params, a: float, x: Params) -> Params:
    """y + a·x for dicts of tensors (no autograd history)."""
    return {k: y[k] + a * x[k] for k in y}


def detach_copy(d: Params) -> Params:
    T.check_tensor_dict(d, "variables", floating=True)
    return {k: v.detach().clone() for k, v in d.items()}


def check_problem(problem: Any) -> None:
    if not isinstance(problem, BilevelProblem):
        raise TypeError(f"problem must be a bilevel.BilevelProblem, got {type(problem).__name__}")


def check_batches(batches: Any, name: str) -> None:
    if not isinstance(batches, Batches):
        raise TypeError(f"{name} must be a bilevel.stochastic.Batches (get, n), got {type(batches).__name__}")


__all__ = [
    "AutogradOracles",
    "Batches",
    "Oracles",
    "Sampler",
    "SamplerState",
    "Schedule",
    "as_oracles",
    "draw",
]
