"""A small "simulated quadratic" bilevel problem with a closed-form value-function gradient.

The design of benchopt's benchmark_bilevel ``simulated`` dataset (Dagréou et al. 2022), written
from its definition at smaller sizes: per-sample quadratics

  inner  g(z, x) = 1/n Σ_i ½ zᵀA_i z + xᵀB_i z + a_iᵀz           mean A_i = A, spectrum in [μ, L]
  outer  f(z, x) = 1/m Σ_j ½ zᵀK_j z + xᵀD_j z + ½ xᵀM_j x + c_jᵀz

with z* (x) = −A⁻¹(Bᵀx + a), h(x) = f(z*(x), x) and

  ∇h(x) = D z* + M x − B A⁻¹ (K z* + Dᵀx + c).

``batch`` is the stack of per-sample matrices; the losses average over it, as benchopt's oracles do.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

import bilevel as bl


def _sym(x: Tensor) -> Tensor:
    return 0.5 * (x + x.transpose(-1, -2))


@dataclass
class SimulatedQuadratic:
    inner_data: tuple[Tensor, Tensor, Tensor]  # A_i [n, d, d], B_i [n, p, d], a_i [n, d]
    outer_data: tuple[Tensor, Tensor, Tensor, Tensor]  # K_j [m, d, d], D_j [m, p, d], M_j [m, p, p], c_j [m, d]

    @classmethod
    def make(cls, *, dim_inner: int = 20, dim_outer: int = 10, n_inner: int = 16, n_outer: int = 16,
             mu: float = 0.1, L: float = 1.0, seed: int = 0, dtype: torch.dtype = torch.float64) -> SimulatedQuadratic:
        g = torch.Generator().manual_seed(seed)

        def randn(*shape: int) -> Tensor:  # drawn in float64: the same problem in every dtype
            return torch.randn(*shape, generator=g, dtype=torch.float64)

        d, p = dim_inner, dim_outer
        q, _ = torch.linalg.qr(randn(d, d))
        A = q @ torch.diag(torch.logspace(torch.log10(torch.tensor(mu)), torch.log10(torch.tensor(L)), d, dtype=torch.float64)) @ q.T
        noise = _sym(randn(n_inner, d, d)) * 0.05
        A_i = A + noise - noise.mean(0)  # per-sample Hessians averaging to A exactly
        B_i = randn(n_inner, p, d) / d**0.5
        a_i = randn(n_inner, d)
        K_i = _sym(randn(n_outer, d, d)) * 0.1 + torch.eye(d, dtype=torch.float64)
        D_i = randn(n_outer, p, d) * 0.1 / d**0.5
        M_i = _sym(randn(n_outer, p, p)) * 0.1 + torch.eye(p, dtype=torch.float64)
        c_i = randn(n_outer, d)
        return cls(tuple(t.to(dtype) for t in (A_i, B_i, a_i)), tuple(t.to(dtype) for t in (K_i, D_i, M_i, c_i)))

    # --- the problem as users write it: z = params["z"], x = hparams["x"] ---
    @staticmethod
    def inner(p: dict, h: dict, batch: tuple) -> Tensor:
        A, B, a = batch
        z, x = p["z"], h["x"]
        return (0.5 * torch.einsum("d,nde,e->n", z, A, z) + torch.einsum("p,npd,d->n", x, B, z) + a @ z).mean()

    @staticmethod
    def outer(p: dict, h: dict, batch: tuple) -> Tensor:
        K, D, M, c = batch
        z, x = p["z"], h["x"]
        return (0.5 * torch.einsum("d,nde,e->n", z, K, z) + torch.einsum("p,npd,d->n", x, D, z)
                + 0.5 * torch.einsum("p,npq,q->n", x, M, x) + c @ z).mean()

    def problem(self) -> bl.BilevelProblem:
        return bl.BilevelProblem(self.inner, self.outer)

    @property
    def dims(self) -> tuple[int, int]:
        return self.inner_data[0].shape[-1], self.inner_data[1].shape[1]

    # --- closed forms ---
    def _means(self) -> tuple[Tensor, ...]:
        """The mean matrices, in float64 whatever the dtype of the data."""
        return tuple(t.double().mean(0) for t in (*self.inner_data, *self.outer_data))

    def z_star(self, x: Tensor) -> Tensor:
        A, B, a, *_ = self._means()
        return -torch.linalg.solve(A, B.T @ x.double() + a)

    def grad_h(self, x: Tensor) -> Tensor:
        """∇h(x) for the value function h(x) = f(z*(x), x), in float64."""
        A, B, a, K, D, M, c = self._means()
        x = x.double()
        z = self.z_star(x)
        return D @ z + M @ x - B @ torch.linalg.solve(A, K @ z + D.T @ x + c)

    def hessian_h(self) -> Tensor:
        A, B, a, K, D, M, c = self._means()
        J = -torch.linalg.solve(A, B.T)  # dz*/dx, [d, p]
        return M + D @ J + J.T @ D.T + J.T @ K @ J
