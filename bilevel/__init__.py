"""bilevel: bilevel optimization and meta-learning for PyTorch.

One problem — inner dynamics w_t = Φ_t(w_{t−1}, λ) from w_0 = Φ_0(λ) and an outer objective
E(w_T, λ) (Franceschi et al. 2018) — and interchangeable hypergradient strategies::

    w_T = bilevel.solve(problem, params0, hparams, batch,
                        dynamics=GradientDescent(lr=0.1), steps=100,
                        hypergrad=Implicit(CG(maxiter=20)))
    problem.outer_loss(w_T, hparams, val_batch).backward()
"""
from bilevel._version import __version__

# --- core: problem, dynamics, hypergradient strategies, linear solvers (issue "Core") ---
from bilevel import dynamics, hypergrad, linsolve
from bilevel._engine import InnerState, NonFiniteError, SolveInfo
from bilevel.dynamics import Adam, Dynamics, GradientDescent, HeavyBall
from bilevel.hypergrad import (
    Checkpointed,
    FirstOrder,
    Forward,
    ForwardMemoryError,
    Implicit,
    InexactHypergradientError,
    InexactHypergradientWarning,
    NoInner,
    Reverse,
    Strategy,
    Truncated,
    fixed_point_condition,
)
from bilevel.linsolve import CG, DivergenceError, Exact, FixedPoint, LinearSolveInfo, LinearSolver, Neumann
from bilevel.problem import BilevelProblem
from bilevel.solve import (
    Hypergradient,
    HypergradientState,
    collect_solve_info,
    hypergradient,
    hypergradient_init,
    solve,
)

__all__ = [
    "__version__",
    # core
    "Adam",
    "BilevelProblem",
    "CG",
    "Checkpointed",
    "DivergenceError",
    "Dynamics",
    "Exact",
    "FirstOrder",
    "FixedPoint",
    "Forward",
    "ForwardMemoryError",
    "GradientDescent",
    "HeavyBall",
    "Hypergradient",
    "collect_solve_info",
    "HypergradientState",
    "Implicit",
    "InexactHypergradientError",
    "InexactHypergradientWarning",
    "InnerState",
    "LinearSolveInfo",
    "LinearSolver",
    "Neumann",
    "NoInner",
    "NonFiniteError",
    "Reverse",
    "SolveInfo",
    "Strategy",
    "Truncated",
    "dynamics",
    "fixed_point_condition",
    "hypergrad",
    "hypergradient",
    "hypergradient_init",
    "linsolve",
    "solve",
]
# --- model files, the learner registry and the QP layer ------------------------------------
# bilevel.data (datasets, episodic samplers), bilevel.models (backbones), bilevel.train (the
# training loop), bilevel.distributed and bilevel.hpo are subpackages/modules with their own
# __all__; they are not imported here, to keep `import bilevel` light and the layers acyclic.
from bilevel import qp  # noqa: E402
from bilevel._atomic import atomic_save  # noqa: E402
from bilevel.io import load, save_learner, save_model  # noqa: E402
from bilevel.qp import QPInfo, solve_qp  # noqa: E402
from bilevel.registry import register_learner  # noqa: E402

__all__ += ["QPInfo", "atomic_save", "load", "qp", "register_learner", "save_learner", "save_model", "solve_qp"]
