"""Stochastic bilevel solvers as explicit-state init/step pairs: SOBA, SABA, AmIGO, StocBiO, F2SA.

Every solver solves  min_x h(x) = F(z*(x), x),  z*(x) = argmin_z G(z, x)  for a
:class:`bilevel.BilevelProblem` with G = ``inner_loss`` and F = ``outer_loss`` written as finite
sums over mini-batches (:class:`Batches`). Usage (optax style)::

    solver = SOBA(step_size=0.1)
    state = solver.init(problem, inner0, outer0, inner_batches, outer_batches, seed=0)
    for _ in range(1000):
        state = solver.step(state, problem, inner_batches, outer_batches)
    z, x = state.inner, state.outer

``step`` is a pure function of its arguments: it reads the state, draws its batches with the
state's samplers, calls only gradient, Hessian-vector and cross-derivative-vector oracles of one
batch at a time (autograd; never a dense Hessian) and returns a new state. It works on any device
(the variables' device) and dtype.

Notation: z = ``params`` (inner), x = ``hparams`` (outer), v ≈ v*(x) = −[∇²_zz G]⁻¹ ∇_z F for
SOBA/SABA (AmIGO and StocBiO solve for −v). Step sizes follow the papers; see each class for the
defaults and for where they deviate (and the module ``bilevel.stochastic`` docstring for a table).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from bilevel._tree import Params
from bilevel.problem import BilevelProblem
from bilevel.stochastic._core import (
    Batches,
    Sampler,
    SamplerState,
    Schedule,
    axpy,
    check_batches,
    check_positive,
    Oracles,
    as_oracles,
    detach_copy,
    draw,
)


class _Solver:
    """Common checks and the sampler set-up shared by all solvers (internal)."""

    name: str = ""

    def _start(self, problem: Any, inner0: Params, outer0: Params, inner_batches: Any, outer_batches: Any,
               seed: int) -> tuple[Params, Params, SamplerState, SamplerState]:
        as_oracles(problem)
        check_batches(inner_batches, "inner_batches")
        check_batches(outer_batches, "outer_batches")
        z, x = detach_copy(inner0), detach_copy(outer0)
        s_in = Sampler(inner_batches.n).init(2 * int(seed))
        s_out = Sampler(outer_batches.n).init(2 * int(seed) + 1)
        return z, x, s_in, s_out

    @staticmethod
    def _check(problem: Any, inner_batches: Any, outer_batches: Any) -> Oracles:
        check_batches(inner_batches, "inner_batches")
        check_batches(outer_batches, "outer_batches")
        return as_oracles(problem)

    def __repr__(self) -> str:  # dataclasses override
        return f"{type(self).__name__}()"


def _inner_sgd(o: Oracles, z: Params, x: Params, batches: Batches, sampler: SamplerState, lr: float,
               steps: int) -> tuple[Params, SamplerState]:
    for _ in range(steps):
        _, b, sampler = draw(batches, sampler)
        z = axpy(z, -lr, o.inner_grad(z, x, b))
    return z, sampler


def _check_double_loop(solver: Any, second: str) -> None:
    """Validate AmIGO/StocBiO options: step sizes, inner steps and the second loop's steps/step size."""
    name = type(solver).__name__
    check_positive(f"{name}(step_size=...)", solver.step_size)
    check_positive(f"{name}(outer_ratio=...)", solver.outer_ratio)
    check_positive(f"{name}(inner_steps=...)", solver.inner_steps, integer=True)
    check_positive(f"{name}({second}_steps=...)", getattr(solver, f"{second}_steps"), integer=True)
    if getattr(solver, f"{second}_step_size") is not None:
        check_positive(f"{name}({second}_step_size=...)", getattr(solver, f"{second}_step_size"))


# ============================================================================ SOBA
class SOBAState(NamedTuple):
    """State of :class:`SOBA`: iterates (z, v, x), the step count t and the two samplers."""

    inner: Params
    v: Params
    outer: Params
    t: int
    inner_sampler: SamplerState
    outer_sampler: SamplerState


@dataclass(frozen=True)
class SOBA(_Solver):
    """SOBA: single-loop stochastic bilevel descent on (z, v, x) jointly.

    Invariant (Dagréou et al. 2022, eq. (5)–(7)): with i ~ inner batches, j ~ outer batches drawn
    independently and all oracles at the current (z_t, v_t, x_t),

        z_{t+1} = z_t − ρ_t ∇_z G_i
        v_{t+1} = v_t − ρ_t (∇²_zz G_i v_t + ∇_z F_j)
        x_{t+1} = x_t − γ_t (∇²_xz G_i v_t + ∇_x F_j)

    so that v tracks v*(x) = −[∇²_zz G]⁻¹ ∇_z F and the x-direction tracks ∇h(x). Per step: one
    gradient + Hessian-vector + cross product of G (one double backward) and one gradient of F.

    Step sizes: ρ_t = ``step_size`` / (t+1)^``inner_decay``, γ_t = ``step_size`` / ``outer_ratio`` /
    (t+1)^``outer_decay``. Defaults: step_size = 0.1, outer_ratio = 1 (benchmark_bilevel's), and the
    paper's decays ρ_t ∝ t^{−2/5}, γ_t ∝ t^{−3/5} (Theorem 1). Deviation: the paper also needs
    ρ̄, γ̄ small enough for its constants; benchmark_bilevel uses t^{−1/2} for both.

    Reference: M. Dagréou, P. Ablin, S. Vaiter, T. Moreau. *A framework for bilevel optimization
    that enables stochastic and global variance reduction algorithms*, NeurIPS 2022, Alg. 1.
    """

    step_size: float = 0.1
    outer_ratio: float = 1.0
    inner_decay: float = 2 / 5
    outer_decay: float = 3 / 5

    def __post_init__(self) -> None:
        check_positive("SOBA(step_size=...)", self.step_size)
        check_positive("SOBA(outer_ratio=...)", self.outer_ratio)
        Schedule(self.step_size, self.inner_decay)
        Schedule(self.step_size, self.outer_decay)

    def init(self, problem: BilevelProblem | Oracles, inner0: Params, outer0: Params, inner_batches: Batches,
             outer_batches: Batches, *, seed: int = 0) -> SOBAState:
        """Start at (z₀, v₀ = 0, x₀) with samplers seeded by ``seed``.

        Args:
            problem: the bilevel problem (G = inner_loss, F = outer_loss), or :class:`Oracles`.
            inner0, outer0: z₀ (params) and x₀ (hparams) as dicts of floating tensors (copied).
            inner_batches, outer_batches: the finite sums of G and F.
            seed: seeds the batch order (epoch permutations).

        Returns:
            The initial :class:`SOBAState` (t = 0).
        """
        z, x, s_in, s_out = self._start(problem, inner0, outer0, inner_batches, outer_batches, seed)
        return SOBAState(z, {k: torch.zeros_like(t) for k, t in z.items()}, x, 0, s_in, s_out)

    def step(self, state: SOBAState, problem: BilevelProblem | Oracles, inner_batches: Batches, outer_batches: Batches) -> SOBAState:
        """One SOBA iteration (one inner and one outer batch); returns the new state."""
        o = self._check(problem, inner_batches, outer_batches)
        rho = Schedule(self.step_size, self.inner_decay)(state.t)
        gamma = Schedule(self.step_size / self.outer_ratio, self.outer_decay)(state.t)
        _, bi, s_in = draw(inner_batches, state.inner_sampler)
        _, bj, s_out = draw(outer_batches, state.outer_sampler)
        gz, hv, cv = o.hvp_cross(state.inner, state.outer, state.v, bi)
        fz, fx = o.outer_grads(state.inner, state.outer, bj)
        z = axpy(state.inner, -rho, gz)  # type: ignore[arg-type]
        v = {k: state.v[k] - rho * (hv[k] + fz[k]) for k in state.v}  # type: ignore[index]
        x = {k: state.outer[k] - gamma * (cv[k] + fx[k]) for k in state.outer}
        return SOBAState(z, v, x, state.t + 1, s_in, s_out)


# ============================================================================ SABA
class SABAState(NamedTuple):
    """State of :class:`SABA`: SOBA's plus the SAGA memories.

    ``memory`` maps each oracle name (``grad``, ``hvp``, ``cross`` per inner batch; ``fz``, ``fx``
    per outer batch) to a dict key -> tensor [n_batches, *shape] of the last value seen per batch;
    ``mean`` holds their weighted averages Σ_i w_i memory[i].
    """

    inner: Params
    v: Params
    outer: Params
    t: int
    inner_sampler: SamplerState
    outer_sampler: SamplerState
    memory: dict[str, Params]
    mean: dict[str, Params]


_SABA_INNER = ("grad", "hvp", "cross")
_SABA_OUTER = ("fz", "fx")


@dataclass(frozen=True)
class SABA(_Solver):
    """SABA: SOBA's directions with SAGA variance reduction (linear convergence, constant steps).

    Invariant (Dagréou et al. 2022, Alg. 2): every oracle D ∈ {∇_z G, ∇²_zz G v, ∇²_xz G v} of the
    sampled inner batch i (and {∇_z F, ∇_x F} of outer batch j) is replaced by the SAGA estimate
    D_i(current) − M_i + Σ_k w_k M_k, after which M_i ← D_i(current); the SOBA updates then use
    these estimates. At a fixed point the estimates equal the full-batch directions, so constant
    step sizes converge (to ∇h = 0) instead of plateauing at the noise level like SOBA.

    Step sizes: constant ρ = ``step_size``, γ = ``step_size`` / ``outer_ratio`` (Theorem 2 takes
    constants ∝ (n+m)^{−2/3}; defaults 0.1 and 1 are benchmark_bilevel's, not tuned to n, m).
    Memory: ``init_memory="full"`` evaluates every batch at (z₀, v₀, x₀) as in the paper;
    ``"zero"`` starts from zeros as benchmark_bilevel does (no initial pass, biased first epoch).

    Args:
        step_size, outer_ratio: see above.
        init_memory: ``"full"`` (paper) or ``"zero"`` (benchmark_bilevel).

    Reference: Dagréou, Ablin, Vaiter, Moreau, NeurIPS 2022, Alg. 2 (SABA), Theorem 2.
    """

    step_size: float = 0.1
    outer_ratio: float = 1.0
    init_memory: str = "full"

    def __post_init__(self) -> None:
        check_positive("SABA(step_size=...)", self.step_size)
        check_positive("SABA(outer_ratio=...)", self.outer_ratio)
        if self.init_memory not in ("full", "zero"):
            raise ValueError(f"SABA(init_memory=...) must be 'full' or 'zero', got {self.init_memory!r}")

    def init(self, problem: BilevelProblem | Oracles, inner0: Params, outer0: Params, inner_batches: Batches,
             outer_batches: Batches, *, seed: int = 0) -> SABAState:
        """Start at (z₀, v₀ = 0, x₀); fill the memories (see ``init_memory``). Args as :meth:`SOBA.init`."""
        z, x, s_in, s_out = self._start(problem, inner0, outer0, inner_batches, outer_batches, seed)
        v = {k: torch.zeros_like(t) for k, t in z.items()}
        shapes = {"grad": z, "hvp": z, "cross": x, "fz": z, "fx": x}
        nb = {**{n: inner_batches.n for n in _SABA_INNER}, **{n: outer_batches.n for n in _SABA_OUTER}}
        memory = {n: {k: torch.zeros((nb[n], *t.shape), dtype=t.dtype, device=t.device) for k, t in shapes[n].items()}
                  for n in shapes}
        mean = {n: {k: torch.zeros_like(t) for k, t in shapes[n].items()} for n in shapes}
        if self.init_memory == "full":
            o = as_oracles(problem)
            for i in range(inner_batches.n):
                gz, hv, cv = o.hvp_cross(z, x, v, inner_batches.get(i))
                for n, d in zip(_SABA_INNER, (gz, hv, cv)):
                    for k, val in d.items():  # type: ignore[union-attr]
                        memory[n][k][i] = val
                        mean[n][k] += inner_batches.weight(i) * val
            for j in range(outer_batches.n):
                for n, d in zip(_SABA_OUTER, o.outer_grads(z, x, outer_batches.get(j))):
                    for k, val in d.items():
                        memory[n][k][j] = val
                        mean[n][k] += outer_batches.weight(j) * val
        return SABAState(z, v, x, 0, s_in, s_out, memory, mean)

    @staticmethod
    def _reduce(memory: dict[str, Params], mean: dict[str, Params], name: str, new: Params, i: int,
                w: float) -> tuple[Params, Params, Params]:
        """SAGA: direction = new − M_i + mean; mean += w (new − M_i); M_i = new (out of place)."""
        mem, avg = memory[name], mean[name]
        direction, mem2, avg2 = {}, {}, {}
        for k, g in new.items():
            diff = g - mem[k][i]
            direction[k] = diff + avg[k]
            avg2[k] = avg[k] + w * diff
            row = mem[k].clone()
            row[i] = g
            mem2[k] = row
        return direction, mem2, avg2

    def step(self, state: SABAState, problem: BilevelProblem | Oracles, inner_batches: Batches, outer_batches: Batches) -> SABAState:
        """One SABA iteration (one inner and one outer batch); returns the new state (memories copied)."""
        o = self._check(problem, inner_batches, outer_batches)
        if any(t.shape[0] != inner_batches.n for t in state.memory["grad"].values()) or \
                any(t.shape[0] != outer_batches.n for t in state.memory["fx"].values()):
            raise ValueError("SABA.step: the state's memories were built for other Batches (different number of batches)")
        rho, gamma = self.step_size, self.step_size / self.outer_ratio
        i, bi, s_in = draw(inner_batches, state.inner_sampler)
        j, bj, s_out = draw(outer_batches, state.outer_sampler)
        gz, hv, cv = o.hvp_cross(state.inner, state.outer, state.v, bi)
        fz, fx = o.outer_grads(state.inner, state.outer, bj)
        memory, mean, d = dict(state.memory), dict(state.mean), {}
        for name, new, idx, w in (("grad", gz, i, inner_batches.weight(i)), ("hvp", hv, i, inner_batches.weight(i)),
                                  ("cross", cv, i, inner_batches.weight(i)), ("fz", fz, j, outer_batches.weight(j)),
                                  ("fx", fx, j, outer_batches.weight(j))):
            d[name], memory[name], mean[name] = self._reduce(state.memory, state.mean, name, new, idx, w)  # type: ignore[arg-type]
        z = axpy(state.inner, -rho, d["grad"])
        v = {k: state.v[k] - rho * (d["hvp"][k] + d["fz"][k]) for k in state.v}
        x = {k: state.outer[k] - gamma * (d["cross"][k] + d["fx"][k]) for k in state.outer}
        return SABAState(z, v, x, state.t + 1, s_in, s_out, memory, mean)


# ============================================================================ AmIGO
class AmIGOState(NamedTuple):
    """State of :class:`AmIGO`: warm-started z and v (v ≈ [∇²_zz G]⁻¹ ∇_z F), x, t, samplers."""

    inner: Params
    v: Params
    outer: Params
    t: int
    inner_sampler: SamplerState
    outer_sampler: SamplerState


@dataclass(frozen=True)
class AmIGO(_Solver):
    """AmIGO: amortized implicit gradient — warm-started inner SGD and linear-system SGD per outer step.

    Invariant (Arbel & Mairal 2022, Alg. 1): per outer step k,
    z ← ``inner_steps`` SGD steps on G(·, x_k) from the previous z (step α);
    (∇_z F_j, ∇_x F_j) at (z, x_k) on one outer batch j;
    v ← ``linsys_steps`` SGD steps on ½ vᵀ ∇²_zz G v − vᵀ ∇_z F_j from the previous v (step β, a
    fresh inner batch per step: v ← v − β (∇²_zz G_i v − ∇_z F_j));
    x ← x − γ (∇_x F_j − ∇²_xz G_i v) on one more inner batch i.

    Step sizes: constant α = β = ``step_size``, γ = ``step_size`` / ``outer_ratio`` (the paper's
    analysis uses constant steps; defaults step_size = 0.1, outer_ratio = 1, 10 + 10 inner steps
    are benchmark_bilevel's). Deviation: the paper allows α ≠ β; here ``linsys_step_size`` (default
    = step_size) sets β.

    Reference: M. Arbel, J. Mairal. *Amortized implicit differentiation for stochastic bilevel
    optimization*, ICLR 2022, Alg. 1–3.
    """

    step_size: float = 0.1
    outer_ratio: float = 1.0
    inner_steps: int = 10
    linsys_steps: int = 10
    linsys_step_size: float | None = None

    def __post_init__(self) -> None:
        _check_double_loop(self, "linsys")

    def init(self, problem: BilevelProblem | Oracles, inner0: Params, outer0: Params, inner_batches: Batches,
             outer_batches: Batches, *, seed: int = 0) -> AmIGOState:
        """Start at (z₀, v₀ = 0, x₀). Args as :meth:`SOBA.init`."""
        z, x, s_in, s_out = self._start(problem, inner0, outer0, inner_batches, outer_batches, seed)
        return AmIGOState(z, {k: torch.zeros_like(t) for k, t in z.items()}, x, 0, s_in, s_out)

    def step(self, state: AmIGOState, problem: BilevelProblem | Oracles, inner_batches: Batches, outer_batches: Batches) -> AmIGOState:
        """One outer iteration (inner_steps + linsys_steps + 1 inner batches, 1 outer batch)."""
        o = self._check(problem, inner_batches, outer_batches)
        alpha = self.step_size
        beta = self.linsys_step_size if self.linsys_step_size is not None else self.step_size
        gamma = self.step_size / self.outer_ratio
        x = state.outer
        z, s_in = _inner_sgd(o, state.inner, x, inner_batches, state.inner_sampler, alpha, self.inner_steps)
        _, bj, s_out = draw(outer_batches, state.outer_sampler)
        fz, fx = o.outer_grads(z, x, bj)
        v = state.v
        for _ in range(self.linsys_steps):
            _, bi, s_in = draw(inner_batches, s_in)
            hv = o.hvp(z, x, v, bi)
            v = {k: v[k] - beta * (hv[k] - fz[k]) for k in v}
        _, bi, s_in = draw(inner_batches, s_in)
        cv = o.hvp_cross(z, x, v, bi, with_grad=False, with_hvp=False)[2]
        x = {k: x[k] - gamma * (fx[k] - cv[k]) for k in x}
        return AmIGOState(z, v, x, state.t + 1, s_in, s_out)


# ============================================================================ StocBiO
class StocBiOState(NamedTuple):
    """State of :class:`StocBiO`: warm-started z, x, t, samplers (v is recomputed every step)."""

    inner: Params
    outer: Params
    t: int
    inner_sampler: SamplerState
    outer_sampler: SamplerState


@dataclass(frozen=True)
class StocBiO(_Solver):
    """StocBiO: warm-started inner SGD, then a stochastic Neumann series for the implicit gradient.

    Invariant (Ji, Yang, Liang 2021, Alg. 2–3): per outer step k,
    z ← ``inner_steps`` SGD steps on G(·, x_k) from the previous z (step α);
    (∇_z F_j, ∇_x F_j) on one outer batch j;
    u = η Σ_{q=0}^{Q} Π_{l=1}^{q} (I − η ∇²_zz G_{i_l}) ∇_z F_j with Q = ``neumann_steps`` fresh
    inner batches (≈ [∇²_zz G]⁻¹ ∇_z F when η < 1/L);
    x ← x − β (∇_x F_j − ∇²_xz G_i u) on one more inner batch i.

    Step sizes: constant α = η = ``step_size`` and β = ``step_size`` / ``outer_ratio`` (the paper's
    Theorem uses constants with η ≤ 1/L; defaults 0.1, 1, D = Q = 10 are benchmark_bilevel's).
    ``neumann_step_size`` sets η separately when given.

    Reference: K. Ji, J. Yang, Y. Liang. *Bilevel optimization: convergence analysis and enhanced
    design*, ICML 2021, Alg. 2 (stocBiO) and Alg. 3 (Neumann hypergradient estimate).
    """

    step_size: float = 0.1
    outer_ratio: float = 1.0
    inner_steps: int = 10
    neumann_steps: int = 10
    neumann_step_size: float | None = None

    def __post_init__(self) -> None:
        _check_double_loop(self, "neumann")

    def init(self, problem: BilevelProblem | Oracles, inner0: Params, outer0: Params, inner_batches: Batches,
             outer_batches: Batches, *, seed: int = 0) -> StocBiOState:
        """Start at (z₀, x₀). Args as :meth:`SOBA.init`."""
        z, x, s_in, s_out = self._start(problem, inner0, outer0, inner_batches, outer_batches, seed)
        return StocBiOState(z, x, 0, s_in, s_out)

    def step(self, state: StocBiOState, problem: BilevelProblem | Oracles, inner_batches: Batches, outer_batches: Batches) -> StocBiOState:
        """One outer iteration (inner_steps + neumann_steps + 1 inner batches, 1 outer batch)."""
        o = self._check(problem, inner_batches, outer_batches)
        alpha = self.step_size
        eta = self.neumann_step_size if self.neumann_step_size is not None else self.step_size
        beta = self.step_size / self.outer_ratio
        x = state.outer
        z, s_in = _inner_sgd(o, state.inner, x, inner_batches, state.inner_sampler, alpha, self.inner_steps)
        _, bj, s_out = draw(outer_batches, state.outer_sampler)
        fz, fx = o.outer_grads(z, x, bj)
        r, acc = dict(fz), dict(fz)
        for _ in range(self.neumann_steps):
            _, bi, s_in = draw(inner_batches, s_in)
            r = axpy(r, -eta, o.hvp(z, x, r, bi))
            acc = axpy(acc, 1.0, r)
        u = {k: eta * t for k, t in acc.items()}
        _, bi, s_in = draw(inner_batches, s_in)
        cv = o.hvp_cross(z, x, u, bi, with_grad=False, with_hvp=False)[2]
        x = {k: x[k] - beta * (fx[k] - cv[k]) for k in x}
        return StocBiOState(z, x, state.t + 1, s_in, s_out)


# ============================================================================ F2SA
class F2SAState(NamedTuple):
    """State of :class:`F2SA`: y (``inner``, minimises F + λG), z (``inner_star``, minimises G), x, t, samplers."""

    inner: Params
    inner_star: Params
    outer: Params
    t: int
    inner_sampler: SamplerState
    outer_sampler: SamplerState


@dataclass(frozen=True)
class F2SA(_Solver):
    """F2SA: fully first-order bilevel optimisation through the penalty f + λ_k (g − g*).

    Invariant (Kwon, Kwon, Wright, Nowak 2023, Alg. 1): with the Lagrangian
    L_λ(x, y) = F(y, x) + λ (G(y, x) − min_z G(z, x)), whose x-gradient approaches ∇h(x) as
    λ → ∞ (error O(1/λ)), each outer step k runs ``inner_steps`` joint SGD steps

        y ← y − α_k (∇_y F_j(y, x) + λ_k ∇_y G_i(y, x)),     z ← z − γ_k ∇_z G_{i'}(z, x)

    (fresh batches i, i', j each step) and then
    x ← x − ξ_k (∇_x F_j(y, x) + λ_k (∇_x G_i(y, x) − ∇_x G_{i'}(z, x))). Gradients only.

    Step sizes (Theorem 3.1's rates for stochastic upper and lower levels):
    α_k = ``step_size`` / (k+1)^{5/7}, γ_k = ``step_size`` / (k+1)^{4/7},
    λ_k = ``lmbda0`` · (k+1)^{1/7} (so that α_k λ_k ∝ γ_k), ξ_k = ``step_size`` / ``outer_ratio`` /
    (k+1)^{5/7} (ξ_k ∝ α_k); ``star_step_size`` sets γ₀ apart from α₀ (default: equal). Defaults
    step_size = 0.01, lmbda0 = 1, 10 inner steps (benchmark_bilevel's). Keep α_k λ_k below
    2/L(G) or the y-iteration diverges. Deviation: benchmark_bilevel instead grows λ by δ/(k+1)^{1/7} per step
    and uses (k+1)^{−4/7} for ξ_k; set ``lmbda_growth`` / ``outer_decay`` to reproduce it.

    Reference: J. Kwon, D. Kwon, S. Wright, R. Nowak. *A fully first-order method for stochastic
    bilevel optimization*, ICML 2023, Alg. 1 and Theorem 3.1.
    """

    step_size: float = 0.01
    outer_ratio: float = 1.0
    lmbda0: float = 1.0
    inner_steps: int = 10
    star_step_size: float | None = None
    inner_decay: float = 5 / 7
    star_decay: float = 4 / 7
    outer_decay: float = 5 / 7
    lmbda_growth: float = 1 / 7

    def __post_init__(self) -> None:
        check_positive("F2SA(step_size=...)", self.step_size)
        check_positive("F2SA(outer_ratio=...)", self.outer_ratio)
        check_positive("F2SA(lmbda0=...)", self.lmbda0)
        check_positive("F2SA(inner_steps=...)", self.inner_steps, integer=True)
        if self.star_step_size is not None:
            check_positive("F2SA(star_step_size=...)", self.star_step_size)
        for name in ("inner_decay", "star_decay", "outer_decay", "lmbda_growth"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not val >= 0:
                raise ValueError(f"F2SA({name}=...) must be a number >= 0, got {val!r}")

    def lmbda(self, t: int) -> float:
        """λ_t = lmbda0 · (t+1)^lmbda_growth."""
        return self.lmbda0 * (t + 1) ** self.lmbda_growth

    def init(self, problem: BilevelProblem | Oracles, inner0: Params, outer0: Params, inner_batches: Batches,
             outer_batches: Batches, *, seed: int = 0) -> F2SAState:
        """Start at y₀ = z₀ = ``inner0``, x₀. Args as :meth:`SOBA.init`."""
        z, x, s_in, s_out = self._start(problem, inner0, outer0, inner_batches, outer_batches, seed)
        return F2SAState(z, {k: t.clone() for k, t in z.items()}, x, 0, s_in, s_out)

    def step(self, state: F2SAState, problem: BilevelProblem | Oracles, inner_batches: Batches, outer_batches: Batches) -> F2SAState:
        """One outer iteration (2·inner_steps + 2 inner batches, inner_steps + 1 outer batches)."""
        o = self._check(problem, inner_batches, outer_batches)
        k = state.t
        a = Schedule(self.step_size, self.inner_decay)(k)
        c = Schedule(self.step_size if self.star_step_size is None else self.star_step_size, self.star_decay)(k)
        xi = Schedule(self.step_size / self.outer_ratio, self.outer_decay)(k)
        lam = self.lmbda(k)
        y, z, x = state.inner, state.inner_star, state.outer
        s_in, s_out = state.inner_sampler, state.outer_sampler
        for _ in range(self.inner_steps):
            _, bi, s_in = draw(inner_batches, s_in)
            _, bi2, s_in = draw(inner_batches, s_in)
            _, bj, s_out = draw(outer_batches, s_out)
            gy = o.inner_grad(y, x, bi)
            fy = o.outer_grads(y, x, bj)[0]
            gz = o.inner_grad(z, x, bi2)
            y = {n: y[n] - a * (fy[n] + lam * gy[n]) for n in y}
            z = axpy(z, -c, gz)
        _, bj, s_out = draw(outer_batches, s_out)
        _, bi, s_in = draw(inner_batches, s_in)
        _, bi2, s_in = draw(inner_batches, s_in)
        fx = o.outer_grads(y, x, bj)[1]
        gx_y = o.inner_grad_both(y, x, bi)[1]
        gx_z = o.inner_grad_both(z, x, bi2)[1]
        x = {n: x[n] - xi * (fx[n] + lam * (gx_y[n] - gx_z[n])) for n in x}
        return F2SAState(y, z, x, k + 1, s_in, s_out)


SOLVERS: dict[str, type] = {"soba": SOBA, "saba": SABA, "amigo": AmIGO, "stocbio": StocBiO, "f2sa": F2SA}

__all__ = [
    "SOLVERS",
    "AmIGO",
    "AmIGOState",
    "F2SA",
    "F2SAState",
    "SABA",
    "SABAState",
    "SOBA",
    "SOBAState",
    "StocBiO",
    "StocBiOState",
]
