"""benchmark_bilevel's three problems as ``bilevel`` problems, with their exact metrics.

* :func:`simulated_quadratic` — the simulated quadratic of benchmark_bilevel's
  ``datasets/simulated.py`` (1024 inner / 1024 outer samples, 100 inner and 100 outer variables,
  per-sample quadratics, μ_inner = 0.1), generated with torch from the same design; its value
  function is quadratic, so ‖∇h(x)‖² and the solution x* are in closed form.
* :func:`l2_logistic` — per-feature L2 selection for binary logistic regression (benchmark's
  ``ijcnn1`` design: G(z, x) = mean log(1 + e^{−y aᵀz}) + ½ Σ_j e^{x_j} z_j², F = validation loss), on
  scikit-learn's digits or MNIST (parity: even vs odd digit); ‖∇h‖² by damped Newton to machine
  precision and a direct solve of the implicit system.
* :func:`data_cleaning` — hyper data cleaning on MNIST (benchmark's ``mnist`` dataset): a fraction
  of training labels is replaced by random ones, G(z, x) = mean σ(x_i) CE_i(z) + reg ‖z‖², F =
  validation cross-entropy; reported metric: test accuracy.

Each returns a :class:`BenchProblem`: the :class:`bilevel.BilevelProblem`, the starting point,
the mini-batch construction and the metric. Batches are contiguous slices of the (once shuffled)
samples, as benchmark_bilevel's ``(start, batch_size)`` oracles.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bilevel._tree import Params
from bilevel.problem import BilevelProblem
from bilevel.stochastic._core import Batches


@dataclass(frozen=True)
class BenchProblem:
    """A benchmark problem: the bilevel problem, its data split into batches, start and metric.

    Invariant: ``problem.inner_loss(z, x, slice(0, n_inner))`` is the full inner objective G and
    ``problem.outer_loss(z, x, slice(0, n_outer))`` the full outer objective F; batch objects are
    slices of sample indices.

    Attributes:
        name: ``"quadratic"``, ``"l2_logistic"`` or ``"data_cleaning"``.
        problem: the :class:`bilevel.BilevelProblem` (batch = a ``slice`` of sample indices).
        inner0, outer0: the starting point z₀, x₀ (dicts of tensors).
        n_inner, n_outer: numbers of inner / outer samples.
        metric: (z, x) -> dict of floats; always holds ``value`` (‖∇h(x)‖², or the test error
            rate for data cleaning — lower is better either way).
        value_name: what ``value`` is, for printing (``"|grad h|^2"`` or ``"test error"``).
        info: problem constants (dimensions, closed-form solution, …).
    """

    name: str
    problem: BilevelProblem
    inner0: Params
    outer0: Params
    n_inner: int
    n_outer: int
    metric: Callable[[Params, Params], dict[str, float]]
    value_name: str = "|grad h|^2"
    info: dict[str, Any] = field(default_factory=dict)

    def batches(self, batch_size: int | str = 64) -> tuple[Batches, Batches]:
        """(inner, outer) :class:`Batches` of ``batch_size`` samples (``"full"``: one batch each)."""
        if batch_size == "full":
            return Batches.contiguous(self.n_inner, self.n_inner), Batches.contiguous(self.n_outer, self.n_outer)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1 or 'full', got {batch_size!r}")
        return Batches.contiguous(self.n_inner, batch_size), Batches.contiguous(self.n_outer, batch_size)

    def full(self) -> tuple[slice, slice]:
        """The batch objects of the full inner and outer objectives."""
        return slice(0, self.n_inner), slice(0, self.n_outer)


# ============================================================================ simulated quadratic
def _orth_sqrt(d: int, mu: float, big: float, g: torch.Generator, *, zero_first: bool) -> Tensor:
    """U diag(s) Uᵀ with U a random orthogonal matrix and s log-spaced in [√mu, √big] (first 0)."""
    u = torch.linalg.svd(torch.randn(d, 1, generator=g, dtype=torch.float64), full_matrices=True)[0]
    if zero_first:
        s = torch.cat([torch.zeros(1, dtype=torch.float64),
                       torch.logspace(math.log10(mu) / 2, math.log10(big) / 2, d - 1, dtype=torch.float64)])
    else:
        s = torch.logspace(math.log10(mu) / 2, math.log10(big) / 2, d, dtype=torch.float64)
    return u @ torch.diag(s) @ u.T


def _gen_level(n: int, dz: int, dx: int, l_z: float, l_x: float, l_cross: float, mu: float,
               g: torch.Generator) -> dict[str, Tensor]:
    """One level's per-sample quadratics (benchmark_utils/gen_matrices.py's design), as rank-one factors.

    Sample i: ½ zᵀ(u_i u_iᵀ)z + ½ xᵀ(p_i p_iᵀ)x + xᵀ(c_i e_iᵀ)z + a_iᵀz + b_iᵀx with
    u_i = A_z ξ_i, E[u uᵀ] = A_z² of spectrum [mu, l_z]; p_i = A_x ξ'_i, spectrum {0} ∪ [mu, l_x];
    c_i = U D ζ_i, e_i = Vᵀ ζ_i, so E[c eᵀ] = U D Vᵀ with singular values log-spaced in [mu, l_cross];
    a_i, b_i ~ N(0, I).
    """
    a_z = _orth_sqrt(dz, mu, l_z, g, zero_first=False)
    u = torch.randn(n, dz, generator=g, dtype=torch.float64) @ a_z
    a_x = _orth_sqrt(dx, mu, l_x, g, zero_first=True)
    p = torch.randn(n, dx, generator=g, dtype=torch.float64) @ a_x
    uu, _, vh = torch.linalg.svd(torch.randn(dx, dz, generator=g, dtype=torch.float64), full_matrices=True)
    k = min(dx, dz)
    dmat = torch.zeros(dx, dz, dtype=torch.float64)
    dmat[range(k), range(k)] = torch.logspace(math.log10(mu), math.log10(l_cross), k, dtype=torch.float64)
    zeta = torch.randn(n, dz, generator=g, dtype=torch.float64)
    c = zeta @ (uu @ dmat).T  # c_i = U D ζ_i   [n, dx]
    e = zeta @ vh.T  # e_i = Vh ζ_i  (as in gen_matrices: X2 = X Vhᵀ)   [n, dz]
    a = torch.randn(n, dz, generator=g, dtype=torch.float64)
    b = torch.randn(n, dx, generator=g, dtype=torch.float64)
    return {"u": u, "p": p, "c": c, "e": e, "a": a, "b": b}


def _quad_loss(d: dict[str, Tensor]) -> Callable[[Params, Params, Any], Tensor]:
    def loss(params: Params, hparams: Params, batch: Any) -> Tensor:
        z, x = params["z"], hparams["x"]
        u, p, c, e, a, b = (d[k][batch] for k in ("u", "p", "c", "e", "a", "b"))
        per = 0.5 * (u @ z) ** 2 + 0.5 * (p @ x) ** 2 + (c @ x) * (e @ z) + a @ z + b @ x
        return per.mean()

    return loss


def _quad_means(d: dict[str, Tensor]) -> dict[str, Tensor]:
    n = d["u"].shape[0]
    return {"Hz": d["u"].T @ d["u"] / n, "Hx": d["p"].T @ d["p"] / n, "C": d["c"].T @ d["e"] / n,
            "a": d["a"].mean(0), "b": d["b"].mean(0)}


def simulated_quadratic(
    *,
    n_inner: int = 1024,
    n_outer: int = 1024,
    dim_inner: int = 100,
    dim_outer: int = 100,
    mu_inner: float = 0.1,
    L_inner_inner: float = 1.0,
    L_inner_outer: float = 1.0,
    L_outer_inner: float = 1.0,
    L_outer_outer: float = 1.0,
    L_cross_inner: float = 0.1,
    L_cross_outer: float = 0.1,
    seed: int = 2442,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> BenchProblem:
    """The simulated quadratic bilevel problem of benchmark_bilevel (written from its definition).

    G(z, x) = (1/n) Σ_i ½ zᵀA_i z + ½ xᵀB_i x + xᵀC_i z + a_iᵀz + b_iᵀx and F likewise with its own
    draw (mean Hessians of spectrum [μ, L], one zero eigenvalue in the x-Hessians, cross terms of
    singular values in [μ, L_cross]). Every per-sample matrix of the generator is rank one
    (A_i = u_i u_iᵀ, C_i = c_i e_iᵀ), so the factors are stored (O(n·d) memory, not O(n·d²)).

    Closed forms: z*(x) = −Ā⁻¹(ā + C̄ᵀx) = J x + z₀*, h(x) = ½ xᵀ M x + qᵀx + const with
    M = JᵀF̄_zz J + F̄_xx + K̄J + (K̄J)ᵀ; ∇h(x) = M x + q and x* = −M⁻¹ q. Like the benchmark, the
    generator is redrawn (next seed, at most 20 times) until λ_min(M) > 1e-12.

    Args:
        n_inner, n_outer: numbers of inner / outer samples (1024, 1024).
        dim_inner, dim_outer: dimensions of z and x (100, 100).
        mu_inner, L_inner_inner, L_inner_outer, L_outer_inner, L_outer_outer, L_cross_inner, L_cross_outer:
            spectrum bounds, as benchmark_bilevel's ``simulated`` dataset.
        seed: the generator seed (torch; the matrices differ from the benchmark's JAX draw).
        dtype, device: of the stored data and of z₀ = 0, x₀ = −2·1 (the benchmark's start).

    Returns:
        A :class:`BenchProblem` (batch = slice of samples; ``info`` holds the closed-form
        ``x_star``, ``z_star``, ``M``, ``lambda_min``, ``lambda_max``).
    """
    for trial in range(20):
        g = torch.Generator().manual_seed(int(seed) + trial)
        din = _gen_level(n_inner, dim_inner, dim_outer, L_inner_inner, L_inner_outer, L_cross_inner, mu_inner, g)
        dout = _gen_level(n_outer, dim_inner, dim_outer, L_outer_inner, L_outer_outer, L_cross_outer, mu_inner, g)
        mi, mo = _quad_means(din), _quad_means(dout)
        jac = -torch.linalg.solve(mi["Hz"], mi["C"].T)  # dz*/dx  [dz, dx]
        z0 = -torch.linalg.solve(mi["Hz"], mi["a"])
        kj = mo["C"] @ jac
        m = jac.T @ mo["Hz"] @ jac + mo["Hx"] + kj + kj.T
        q = jac.T @ (mo["Hz"] @ z0) + mo["C"] @ z0 + jac.T @ mo["a"] + mo["b"]
        eig = torch.linalg.eigvalsh(0.5 * (m + m.T))
        if float(eig[0]) > 1e-12:
            break
    else:
        raise ValueError("simulated_quadratic: could not draw a value function with a positive definite Hessian in 20 trials")
    x_star = -torch.linalg.solve(m, q)
    z_star = jac @ x_star + z0
    data_in = {k: v.to(dtype=dtype, device=device) for k, v in din.items()}
    data_out = {k: v.to(dtype=dtype, device=device) for k, v in dout.items()}
    problem = BilevelProblem(_quad_loss(data_in), _quad_loss(data_out))

    def metric(inner: Params, outer: Params) -> dict[str, float]:
        x = outer["x"].detach().to(dtype=torch.float64, device="cpu")
        z = inner["z"].detach().to(dtype=torch.float64, device="cpu")
        grad = m @ x + q
        zs = jac @ x + z0
        return {"value": float(grad @ grad), "inner_distance": float(((z - zs) ** 2).sum()),
                "outer_distance": float(((x - x_star) ** 2).sum())}

    info = {"x_star": x_star, "z_star": z_star, "M": m, "q": q, "jac": jac, "z0_star": z0,
            "lambda_min": float(eig[0]), "lambda_max": float(eig[-1]), "trials": trial + 1,
            "means_inner": mi, "means_outer": mo, "data_inner": data_in, "data_outer": data_out}
    return BenchProblem(
        "quadratic", problem,
        {"z": torch.zeros(dim_inner, dtype=dtype, device=device)},
        {"x": torch.full((dim_outer,), -2.0, dtype=dtype, device=device)},
        n_inner, n_outer, metric, "|grad h|^2", info,
    )


# ============================================================================ data
def _load(dataset: str, data_root: str | Path | None) -> tuple[Tensor, Tensor]:
    from bilevel.hpo.data import load_dataset

    if dataset == "mnist" and data_root is None:
        from bilevel.hpo.data import OptionError

        raise OptionError("data_root", "dataset 'mnist' needs data_root: a folder holding mnist10k.npz (e.g. ../shared/data)")
    x, y, _ = load_dataset(dataset, data_root)
    return x.double(), y


def _standardize(train: Tensor, *others: Tensor) -> tuple[Tensor, ...]:
    mean, std = train.mean(0), train.std(0)
    keep = std > 1e-8  # constant pixels carry no information (and no gradient)
    out = [(t[:, keep] - mean[keep]) / std[keep] for t in (train, *others)]
    return tuple(out)


# ============================================================================ L2 selection
def _logistic_losses(a_tr: Tensor, y_tr: Tensor, a_val: Tensor, y_val: Tensor) -> BilevelProblem:
    def inner_loss(params: Params, hparams: Params, batch: Any) -> Tensor:
        z, x = params["z"], hparams["x"]
        margin = y_tr[batch] * (a_tr[batch] @ z)
        return F.softplus(-margin).mean() + 0.5 * (x.exp() * z * z).sum()

    def outer_loss(params: Params, hparams: Params, batch: Any) -> Tensor:
        return F.softplus(-y_val[batch] * (a_val[batch] @ params["z"])).mean()

    return BilevelProblem(inner_loss, outer_loss)


def l2_logistic(
    *,
    dataset: str = "digits",
    data_root: str | Path | None = None,
    n_inner: int | None = None,
    n_outer: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> BenchProblem:
    """Per-feature L2 selection for binary logistic regression (benchmark_bilevel's ``ijcnn1`` design).

    G(z, x) = (1/n) Σ_i log(1 + exp(−y_i a_iᵀz)) + ½ Σ_j exp(x_j) z_j²  (training set),
    F(z, x) = (1/m) Σ_j log(1 + exp(−y_j a_jᵀz))  (validation set), y = ±1 for even / odd digits.
    Features are standardised with training statistics; constant features are dropped. Start:
    z₀ ~ N(0, I), x₀ = log U(0, 1) (as the benchmark's ``init_var``).

    The metric solves the inner problem to ‖∇_z G‖ ≤ 1e-12 by damped Newton from the current z
    (full Hessian Aᵀ diag(σ(1−σ)) A / n + diag(eˣ), fine for ≤ a few thousand features) and
    computes ∇h(x) = ∇²_xz G v with v = −[∇²_zz G]⁻¹ ∇_z F by a Cholesky solve, in float64.

    Args:
        dataset: ``"digits"`` (scikit-learn's 8×8 digits, offline; 1797 samples) or ``"mnist"``
            (``mnist10k.npz`` under ``data_root``).
        data_root: folder holding ``mnist10k.npz`` (needed for MNIST).
        n_inner, n_outer: training / validation sizes (default: half of the data each).
        seed: shuffles the data and draws z₀, x₀.
        dtype, device: of the data and variables.

    Returns:
        A :class:`BenchProblem`; ``info`` holds the feature count and the data.
    """
    a, y = _load(dataset, data_root)
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(len(y), generator=g)
    a, y = a[perm], y[perm]
    n_inner = n_inner if n_inner is not None else len(y) // 2
    n_outer = n_outer if n_outer is not None else len(y) - n_inner
    if n_inner < 1 or n_outer < 1 or n_inner + n_outer > len(y):
        raise ValueError(f"l2_logistic: n_inner={n_inner}, n_outer={n_outer} do not fit in {len(y)} samples of {dataset!r}")
    sign = 1.0 - 2.0 * (y % 2).double()  # +1 even, −1 odd
    a_tr, a_val = _standardize(a[:n_inner], a[n_inner:n_inner + n_outer])
    y_tr, y_val = sign[:n_inner], sign[n_inner:n_inner + n_outer]
    d = a_tr.shape[1]
    z0 = torch.randn(d, generator=g, dtype=torch.float64)
    x0 = torch.log(torch.rand(d, generator=g, dtype=torch.float64))
    cast = lambda t: t.to(dtype=dtype, device=device)  # noqa: E731
    problem = _logistic_losses(cast(a_tr), cast(y_tr), cast(a_val), cast(y_val))

    def metric(inner: Params, outer: Params) -> dict[str, float]:
        x = outer["x"].detach().to(dtype=torch.float64, device="cpu")
        z = inner["z"].detach().to(dtype=torch.float64, device="cpu")
        zs = _logistic_argmin(a_tr, y_tr, x, z)
        s = torch.sigmoid(y_tr * (a_tr @ zs))
        hess = (a_tr.T * (s * (1 - s))) @ a_tr / n_inner + torch.diag(x.exp())
        sv = torch.sigmoid(y_val * (a_val @ zs))
        fz = a_val.T @ (-(1 - sv) * y_val) / n_outer
        v = -torch.cholesky_solve(fz[:, None], torch.linalg.cholesky(hess))[:, 0]
        grad = x.exp() * zs * v  # ∇²_xz G v = diag(eˣ ⊙ z*) v;  ∇_x F = 0
        val = float(F.softplus(-y_val * (a_val @ zs)).mean())
        return {"value": float(grad @ grad), "value_func": val, "inner_distance": float(((z - zs) ** 2).sum())}

    return BenchProblem("l2_logistic", problem, {"z": cast(z0)}, {"x": cast(x0)}, n_inner, n_outer, metric,
                        "|grad h|^2", {"features": d, "dataset": dataset, "data": (a_tr, y_tr, a_val, y_val)})


def _logistic_argmin(a: Tensor, y: Tensor, x: Tensor, z: Tensor, *, tol: float = 1e-13, max_iter: int = 100) -> Tensor:
    """argmin_z mean log(1+exp(−y aᵀz)) + ½ Σ eˣ z² by damped Newton (float64), from ``z``."""
    n, lam = len(y), x.exp()

    def obj(w: Tensor) -> Tensor:
        return F.softplus(-y * (a @ w)).mean() + 0.5 * (lam * w * w).sum()

    if not bool(torch.isfinite(z).all()):
        z = torch.zeros_like(z)
    prev = math.inf
    for it in range(max_iter):
        s = torch.sigmoid(y * (a @ z))
        grad = a.T @ (-(1 - s) * y) / n + lam * z
        gnorm = float(grad.norm())
        # stop at the tolerance, or once Newton stops improving at rounding level (‖∇G‖ < 1e-9)
        if gnorm <= tol * max(1.0, float(lam.max())) or (gnorm < 1e-9 and gnorm >= prev):
            return z
        prev = gnorm
        hess = (a.T * (s * (1 - s))) @ a / n + torch.diag(lam)
        step = torch.cholesky_solve(grad[:, None], torch.linalg.cholesky(hess))[:, 0]
        t = 1.0
        if float(grad.norm()) > 1e-6:  # damping far from z*; near it, full (quadratically convergent) steps
            f0, slope = float(obj(z)), float(grad @ step)
            while t > 1e-10 and float(obj(z - t * step)) > f0 - 1e-4 * t * slope:
                t *= 0.5
        z = z - t * step
    warnings.warn(f"l2_logistic metric: Newton did not reach ‖∇G‖ ≤ {tol:g} in {max_iter} iterations "
                  f"(‖∇G‖ = {float(grad.norm()):.3e}); ‖∇h‖² is approximate", RuntimeWarning, stacklevel=3)
    return z


# ============================================================================ data cleaning
def data_cleaning(
    *,
    data_root: str | Path,
    n_inner: int = 5000,
    n_outer: int = 2000,
    n_test: int = 3000,
    ratio: float = 0.5,
    reg: float = 0.2,
    seed: int = 32,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> BenchProblem:
    """Hyper data cleaning on MNIST (benchmark_bilevel's ``mnist`` dataset, on ``mnist10k.npz``).

    With probability ``ratio`` each training label is replaced by a uniform random label (it may
    stay correct). G(z, x) = (1/n) Σ_i σ(x_i) CE(zᵀa_i, y_i) + reg ‖z‖² with z ∈ R^{D×10}
    (multinomial logistic regression) and one outer variable per training sample;
    F(z, x) = (1/m) Σ_j CE(zᵀa_j, y_j) on clean validation data. Features standardised with the
    training statistics (constant pixels dropped). Start z₀ = 0, x₀ = −2·1 (the benchmark's).

    The metric reports the test error (``value``, lower is better), test accuracy, validation
    and training accuracies, and the share of corrupted samples among those with σ(x_i) < ½.

    Args:
        data_root: folder holding ``mnist10k.npz`` (or the .npz path).
        n_inner, n_outer, n_test: sizes of the corrupted training, clean validation and test sets
            (the benchmark uses 20000/5000/10000 of the full MNIST; 10000 images are available here).
        ratio: corruption probability (benchmark: 0.5, 0.7 or 0.9).
        reg: the ridge weight (benchmark: 0.2, applied as reg·‖z‖²).
        seed: shuffling and corruption seed.
        dtype, device: of the data and variables.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"data_cleaning(ratio=...) must be in [0, 1), got {ratio!r}")
    a, y = _load("mnist", data_root)
    if n_inner + n_outer + n_test > len(y):
        raise ValueError(f"data_cleaning: n_inner + n_outer + n_test = {n_inner + n_outer + n_test} > {len(y)} samples")
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(len(y), generator=g)
    a, y = a[perm], y[perm]
    tr, va, te = slice(0, n_inner), slice(n_inner, n_inner + n_outer), slice(n_inner + n_outer, n_inner + n_outer + n_test)
    y_tr = y[tr].clone()
    corrupted = torch.rand(n_inner, generator=g) < ratio
    y_tr[corrupted] = torch.randint(0, 10, (int(corrupted.sum()),), generator=g)
    a_tr, a_val, a_te = _standardize(a[tr], a[va], a[te])
    d = a_tr.shape[1]
    cast = lambda t: t.to(dtype=dtype, device=device)  # noqa: E731
    a_tr_c, a_val_c = cast(a_tr), cast(a_val)
    y_tr_c, y_val_c = y_tr.to(device), y[va].to(device)

    def inner_loss(params: Params, hparams: Params, batch: Any) -> Tensor:
        w = params["W"]
        ce = F.cross_entropy(a_tr_c[batch] @ w, y_tr_c[batch], reduction="none")
        return (torch.sigmoid(hparams["x"][batch]) * ce).mean() + reg * (w * w).sum()

    def outer_loss(params: Params, hparams: Params, batch: Any) -> Tensor:
        return F.cross_entropy(a_val_c[batch] @ params["W"], y_val_c[batch])

    y_te, y_va = y[te], y[va]

    def metric(inner: Params, outer: Params) -> dict[str, float]:
        w = inner["W"].detach().to(dtype=torch.float64, device="cpu")
        x = outer["x"].detach().to(dtype=torch.float64, device="cpu")
        acc = lambda aa, yy: float(((aa @ w).argmax(1) == yy).double().mean())  # noqa: E731
        test_acc = acc(a_te, y_te)
        low = torch.sigmoid(x) < 0.5
        return {"value": 1.0 - test_acc, "test_accuracy": test_acc, "val_accuracy": acc(a_val, y_va),
                "train_accuracy": acc(a_tr, y_tr),
                "flagged_corrupted": float(corrupted[low].double().mean()) if bool(low.any()) else float("nan")}

    return BenchProblem("data_cleaning", BilevelProblem(inner_loss, outer_loss),
                        {"W": torch.zeros(d, 10, dtype=dtype, device=device)},
                        {"x": torch.full((n_inner,), -2.0, dtype=dtype, device=device)},
                        n_inner, n_outer, metric, "test error",
                        {"features": d, "corrupted": corrupted, "ratio": ratio, "reg": reg})


PROBLEMS: dict[str, Callable[..., BenchProblem]] = {
    "quadratic": simulated_quadratic,
    "l2_logistic": l2_logistic,
    "data_cleaning": data_cleaning,
}

__all__ = ["PROBLEMS", "BenchProblem", "data_cleaning", "l2_logistic", "simulated_quadratic"]
