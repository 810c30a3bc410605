"""Stochastic bilevel solvers (SOBA, SABA, AmIGO, StocBiO, F2SA) and benchmark_bilevel's problems.

Solvers are explicit-state init/step objects on a :class:`bilevel.BilevelProblem` whose losses
are finite sums over mini-batches (:class:`Batches`); each step draws its own batches with the
samplers carried in the state and calls only mini-batch gradients, Hessian-vector and
cross-derivative-vector products (:class:`AutogradOracles`, or any :class:`Oracles`)::

    from bilevel.stochastic import SABA, simulated_quadratic
    bench = simulated_quadratic()
    inner_b, outer_b = bench.batches(64)
    solver = SABA(step_size=0.1)
    state = solver.init(bench.problem, bench.inner0, bench.outer0, inner_b, outer_b, seed=0)
    for _ in range(2000):
        state = solver.step(state, bench.problem, inner_b, outer_b)
    bench.metric(state.inner, state.outer)["value"]      # ‖∇h(x)‖²

Step sizes (defaults; η_t = base / (t+1)^p):

=========  ==========================================  ====================================
solver     defaults                                     vs. the paper
=========  ==========================================  ====================================
SOBA       ρ_t = 0.1 t^{-2/5}, γ_t = 0.1 t^{-3/5}         paper's decays (Thm 1); benchmark
                                                        uses t^{-1/2} for both
SABA       ρ = γ = 0.1 constant, memory filled at z₀    paper: constants ∝ (n+m)^{-2/3};
                                                        benchmark starts memory at zero
AmIGO      α = β = γ = 0.1, 10 inner + 10 linsys steps  constant steps as the paper
StocBiO    α = η = β = 0.1, D = Q = 10                   constant steps as the paper
F2SA       α_k = .01 k^{-5/7}, γ_k = .01 k^{-4/7},        Thm 3.1 rates; benchmark grows λ by
           λ_k = k^{1/7}, ξ_k = .01 k^{-5/7}, T = 10       δ k^{-1/7} and uses ξ_k ∝ k^{-4/7}
=========  ==========================================  ====================================

References: Dagréou, Ablin, Vaiter, Moreau (NeurIPS 2022); Arbel & Mairal (ICLR 2022); Ji, Yang,
Liang (ICML 2021); Kwon, Kwon, Wright, Nowak (ICML 2023); benchmark: benchopt/benchmark_bilevel.
"""
from __future__ import annotations

from bilevel.stochastic._core import AutogradOracles, Batches, Oracles, Sampler, SamplerState, Schedule, as_oracles
from bilevel.stochastic.problems import PROBLEMS, BenchProblem, data_cleaning, l2_logistic, simulated_quadratic
from bilevel.stochastic.runner import Trace, run
from bilevel.stochastic.solvers import (
    SOLVERS,
    AmIGO,
    AmIGOState,
    F2SA,
    F2SAState,
    SABA,
    SABAState,
    SOBA,
    SOBAState,
    StocBiO,
    StocBiOState,
)

__all__ = [
    "PROBLEMS",
    "SOLVERS",
    "AmIGO",
    "AmIGOState",
    "AutogradOracles",
    "Batches",
    "BenchProblem",
    "F2SA",
    "F2SAState",
    "Oracles",
    "SABA",
    "SABAState",
    "SOBA",
    "SOBAState",
    "Sampler",
    "SamplerState",
    "Schedule",
    "StocBiO",
    "StocBiOState",
    "Trace",
    "as_oracles",
    "data_cleaning",
    "l2_logistic",
    "run",
    "simulated_quadratic",
]
