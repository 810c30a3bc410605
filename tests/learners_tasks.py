"""Tiny episodes and independent oracles shared by the ``test_learners_*`` tests (not collected)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from bilevel.data.sampler import Episodes


def regression_episodes(gen: torch.Generator, dtype: torch.dtype, b: int = 2, k: int = 5, q: int = 4) -> Episodes:
    """B sinusoid-like regression episodes: x [B, k, 1], y [B, k, 1]."""
    def draw(n: int) -> tuple[Tensor, Tensor]:
        x = torch.rand(b, n, 1, generator=gen, dtype=dtype) * 4 - 2
        return x, torch.sin(x + torch.arange(b, dtype=dtype)[:, None, None])

    sx, sy = draw(k)
    qx, qy = draw(q)
    return Episodes(sx, sy, qx, qy)


def image_episodes(gen: torch.Generator, dtype: torch.dtype, b: int = 2, ways: int = 2, shots: int = 2, queries: int = 2,
                   size: int = 16) -> Episodes:
    """B random N-way K-shot image episodes [B, N*K, 1, size, size] with class-major labels."""
    def draw(per: int) -> tuple[Tensor, Tensor]:
        y = torch.arange(ways).repeat_interleave(per).expand(b, -1).contiguous()
        x = torch.randn(b, ways * per, 1, size, size, generator=gen, dtype=dtype) + y[..., None, None, None].to(dtype)
        return x, y

    sx, sy = draw(shots)
    qx, qy = draw(queries)
    return Episodes(sx, sy, qx, qy)


def mlp_forward(p: dict[str, Tensor], x: Tensor) -> Tensor:
    """The 1 -> H -> 1 ReLU MLP written by hand (independent of functional_call)."""
    return torch.relu(x @ p["net.0.weight"].T + p["net.0.bias"]) @ p["net.2.weight"].T + p["net.2.bias"]


def grads_of(loss: Tensor, module: nn.Module) -> dict[str, Tensor]:
    """d loss / d parameter for every trainable parameter of ``module`` (zeros where unused)."""
    names, params = zip(*((k, p) for k, p in module.named_parameters() if p.requires_grad))
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    return {k: (g if g is not None else torch.zeros_like(p)) for k, g, p in zip(names, gs, params)}


def directional_fd(fn: Callable[[], Tensor], module: nn.Module, direction: dict[str, Tensor], eps: float = 1e-6) -> float:
    """Central difference (fn(θ + εd) − fn(θ − εd)) / 2ε over ``module``'s parameters."""
    params = dict(module.named_parameters())
    values = []
    with torch.no_grad():
        for sign in (1.0, -1.0):
            for k, d in direction.items():
                params[k].add_(sign * eps * d)
            values.append(float(fn()))
            for k, d in direction.items():
                params[k].sub_(sign * eps * d)
    return (values[0] - values[1]) / (2 * eps)


def random_direction(module: nn.Module, gen: torch.Generator) -> dict[str, Tensor]:
    """A random unit-scale direction over every trainable parameter of ``module``."""
    return {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in module.named_parameters() if p.requires_grad}


def dot(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return float(sum((a[k] * b[k]).sum() for k in b))
