"""bilevel: bilevel optimization and meta-learning for PyTorch."""
__version__ = "0.1.0"
__all__ = ["__version__"]

# --- heads: batched differentiable QP layer (issue "heads"; see bilevel.qp) ---
from bilevel import qp  # noqa: E402
from bilevel.qp import QPInfo, solve_qp  # noqa: E402

__all__ += ["QPInfo", "qp", "solve_qp"]
