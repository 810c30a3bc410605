"""Ridge regression with closed-form hypergradients (shared by core tests and the accuracy script).

Inner loss   L(w; λ) = ½‖Xw − y‖²/n + ½ λ‖w‖²,      A = XᵀX/n + λI,  c = Xᵀy/n
Dynamics     w_t = w_{t−1} − η ∇L(w_{t−1}) = (I − ηA) w_{t−1} + η c,   w_0 = 0
Outer loss   E(w) = ½‖X_v w − y_v‖²/n_v

In the eigenbasis of XᵀX/n = V diag(s) Vᵀ (a_i = s_i + λ, c̃ = Vᵀc):
  w_T,i = c̃_i (1 − (1 − η a_i)^T) / a_i
  ∂w_T,i/∂λ = c̃_i [T η (1 − η a_i)^{T−1} a_i − (1 − (1 − η a_i)^T)] / a_i²
  ∂w_T,i/∂η = c̃_i T (1 − η a_i)^{T−1}
and at the exact argmin w* = A⁻¹c:  dw*/dλ = −A⁻¹ w*,  dw*/dη = 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

import bilevel as bl


@dataclass
class Ridge:
    X: Tensor
    y: Tensor
    Xv: Tensor
    yv: Tensor

    @classmethod
    def make(cls, n: int = 40, d: int = 6, nv: int = 30, seed: int = 0, dtype: torch.dtype = torch.float64) -> "Ridge":
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(n, d, generator=g, dtype=dtype)
        w_true = torch.randn(d, generator=g, dtype=dtype)
        y = X @ w_true + 0.5 * torch.randn(n, generator=g, dtype=dtype)
        Xv = torch.randn(nv, d, generator=g, dtype=dtype)
        yv = Xv @ w_true + 0.5 * torch.randn(nv, generator=g, dtype=dtype)
        return cls(X, y, Xv, yv)

    # --- the problem as users write it ---
    @staticmethod
    def inner(p: dict, h: dict, batch: tuple) -> Tensor:
        X, y = batch
        return 0.5 * ((X @ p["w"] - y) ** 2).mean() + 0.5 * h["l2"] * (p["w"] ** 2).sum()

    @staticmethod
    def outer(p: dict, h: dict, batch: tuple) -> Tensor:
        X, y = batch
        return 0.5 * ((X @ p["w"] - y) ** 2).mean()

    def problem(self) -> bl.BilevelProblem:
        return bl.BilevelProblem(self.inner, self.outer)

    @property
    def train(self) -> tuple[Tensor, Tensor]:
        return self.X, self.y

    @property
    def val(self) -> tuple[Tensor, Tensor]:
        return self.Xv, self.yv

    def params0(self) -> dict:
        return {"w": torch.zeros(self.X.shape[1], dtype=self.X.dtype)}

    def hparams(self, l2: float = 0.1, lr: float = 0.2) -> dict:
        dt = self.X.dtype
        return {
            "l2": torch.tensor(l2, dtype=dt, requires_grad=True),
            "lr": torch.tensor(lr, dtype=dt, requires_grad=True),
        }

    # --- closed forms ---
    def _eig(self, l2: float):
        n = self.X.shape[0]
        s, V = torch.linalg.eigh(self.X.T @ self.X / n)
        c = self.X.T @ self.y / n
        return s + l2, V, V.T @ c

    def grad_outer(self, w: Tensor) -> Tensor:
        return self.Xv.T @ (self.Xv @ w - self.yv) / self.Xv.shape[0]

    def unrolled(self, l2: float, lr: float, T: int) -> tuple[Tensor, Tensor, Tensor]:
        """(w_T, dE/dλ, dE/dη) for T steps of gradient descent from 0."""
        a, V, ct = self._eig(l2)
        q = 1 - lr * a
        w = V @ (ct * (1 - q**T) / a)
        dw_dl2 = V @ (ct * (T * lr * q ** (T - 1) * a - (1 - q**T)) / a**2)
        dw_dlr = V @ (ct * T * q ** (T - 1))
        ge = self.grad_outer(w)
        return w, ge @ dw_dl2, ge @ dw_dlr

    def argmin(self, l2: float) -> tuple[Tensor, Tensor]:
        """(w*, dE/dλ at w*) for the exact argmin."""
        a, V, ct = self._eig(l2)
        w = V @ (ct / a)
        dw = -(V @ ((V.T @ w) / a))
        return w, self.grad_outer(w) @ dw
