"""bilevel: bilevel optimization and meta-learning for PyTorch.

One problem — inner dynamics w_t = Φ_t(w_{t−1}, λ) from w_0 = Φ_0(λ) and an outer objective
E(w_T, λ) (Franceschi et al. 2018) — and interchangeable hypergradient strategies::

    w_T = bilevel.solve(problem, params0, hparams, batch,
                        dynamics=GradientDescent(lr=0.1), steps=100,
                        hypergrad=Implicit(CG(maxiter=20)))
    problem.outer_loss(w_T, hparams, val_batch).backward()
"""
__version__ = "0.1.0"

# --- core: problem, dynamics, hypergradient strategies, linear solvers (issue "Core") ---
from bilevel import dynamics, hypergrad, linsolve
from bilevel._engine import InnerState
from bilevel.dynamics import Adam, Dynamics, GradientDescent, HeavyBall
from bilevel.hypergrad import (
    Checkpointed,
    FirstOrder,
    Forward,
    Implicit,
    NoInner,
    Reverse,
    Strategy,
    Truncated,
    fixed_point_condition,
)
from bilevel.linsolve import CG, Exact, FixedPoint, LinearSolver, Neumann
from bilevel.problem import BilevelProblem
from bilevel.solve import Hypergradient, hypergradient, solve

__all__ = [
    "__version__",
    # core
    "Adam",
    "BilevelProblem",
    "CG",
    "Checkpointed",
    "Dynamics",
    "Exact",
    "FirstOrder",
    "FixedPoint",
    "Forward",
    "GradientDescent",
    "HeavyBall",
    "Hypergradient",
    "Implicit",
    "InnerState",
    "LinearSolver",
    "Neumann",
    "NoInner",
    "Reverse",
    "Strategy",
    "Truncated",
    "dynamics",
    "fixed_point_condition",
    "hypergrad",
    "hypergradient",
    "linsolve",
    "solve",
]
# --- fewshot (issue 4): model files and the inference API -------------------------------
# bilevel.data (datasets, episodic samplers) and bilevel.models (backbones) are subpackages
# with their own __all__; they are not imported here to keep `import bilevel` light.
from bilevel.io import atomic_save, load, save_model  # noqa: E402

__all__ += ["atomic_save", "load", "save_model"]
# --- end fewshot ---------------------------------------------------------------------------
# --- distributed (issue 7): data-parallel meta-training -----------------------------------
# bilevel.distributed (process groups from torchrun's environment, average_gradients, launch)
# is a submodule with its own __all__; it is not imported here to keep `import bilevel` light.
# --- end distributed -----------------------------------------------------------------------

# --- hpo (issue 6): gradient-based hyperparameter optimization (data, hyper-loop, lr/l2/clean tasks) ---
# Light to import: scikit-learn, torchvision, tqdm and matplotlib load only when used.
from bilevel import hpo  # noqa: E402

__all__ += ["hpo"]
# --- end hpo ---

# --- heads: batched differentiable QP layer (issue "heads"; see bilevel.qp) ---
from bilevel import qp  # noqa: E402
from bilevel.qp import QPInfo, solve_qp  # noqa: E402

__all__ += ["QPInfo", "qp", "solve_qp"]
# --- end heads ---
