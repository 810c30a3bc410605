"""Small helpers for dicts of tensors (``params``, ``hparams``) and state pytrees.

Internal module: validation with precise error messages, and the handful of vector-space
operations the linear solvers need.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

Params = dict[str, Tensor]

tree_map = pytree.tree_map
tree_flatten = pytree.tree_flatten
tree_unflatten = pytree.tree_unflatten


def check_tensor_dict(d: Any, name: str, *, allow_empty: bool = False, floating: bool = False) -> None:
    """Raise a precise TypeError/ValueError unless ``d`` is a dict ``str -> Tensor``."""
    if not isinstance(d, Mapping):
        raise TypeError(f"{name} must be a dict of tensors, got {type(d).__name__}")
    if not d and not allow_empty:
        raise ValueError(f"{name} is empty: it needs at least one tensor")
    for k, v in d.items():
        if not isinstance(k, str):
            raise TypeError(f"{name} keys must be strings, got key {k!r} ({type(k).__name__})")
        if not isinstance(v, Tensor):
            raise TypeError(f"{name}[{k!r}] must be a torch.Tensor, got {type(v).__name__}")
        if floating and not v.is_floating_point():
            raise TypeError(f"{name}[{k!r}] must be a floating-point tensor, got dtype {v.dtype}")


def check_like(ref: Mapping[str, Tensor], other: Any, what: str, where: str = "") -> None:
    """Check that ``other`` has exactly the keys and shapes of ``ref``; name the culprit if not."""
    suffix = f" {where}" if where else ""
    if not isinstance(other, Mapping):
        raise TypeError(f"{what}{suffix} must be a dict of tensors, got {type(other).__name__}")
    missing = [k for k in ref if k not in other]
    extra = [k for k in other if k not in ref]
    if missing or extra:
        raise ValueError(
            f"{what}{suffix} has keys that do not match params: missing {missing}, unexpected {extra}"
        )
    for k, r in ref.items():
        o = other[k]
        if not isinstance(o, Tensor):
            raise TypeError(f"{what}[{k!r}]{suffix} must be a torch.Tensor, got {type(o).__name__}")
        if o.shape != r.shape:
            raise ValueError(
                f"{what}[{k!r}]{suffix} has shape {list(o.shape)}, expected {list(r.shape)} (the shape of params[{k!r}])"
            )


def detach(tree: Any) -> Any:
    return tree_map(lambda x: x.detach() if isinstance(x, Tensor) else x, tree)


def detach_requires_grad(d: Mapping[str, Tensor]) -> Params:
    return {k: v.detach().requires_grad_(True) for k, v in d.items()}


def any_requires_grad(tree: Any) -> bool:
    leaves, _ = tree_flatten(tree)
    return any(isinstance(x, Tensor) and x.requires_grad for x in leaves)


def add(a: Params, b: Params, alpha: float | Tensor = 1.0) -> Params:
    return {k: a[k] + alpha * b[k] for k in a}


def sub(a: Params, b: Params) -> Params:
    return {k: a[k] - b[k] for k in a}


def scale(a: Params, alpha: float | Tensor) -> Params:
    return {k: alpha * v for k, v in a.items()}


def dot(a: Params, b: Params) -> Tensor:
    return sum((a[k] * b[k]).sum() for k in a)  # type: ignore[return-value]


def zeros_like(a: Params) -> Params:
    return {k: torch.zeros_like(v) for k, v in a.items()}


def numel(a: Mapping[str, Tensor]) -> int:
    return sum(v.numel() for v in a.values())


def flatten(a: Mapping[str, Tensor]) -> Tensor:
    return torch.cat([v.reshape(-1) for v in a.values()]) if a else torch.zeros(0)


def unflatten(vec: Tensor, like: Mapping[str, Tensor]) -> Params:
    out, i = {}, 0
    for k, v in like.items():
        n = v.numel()
        out[k] = vec[i : i + n].reshape(v.shape)
        i += n
    return out


__all__ = [
    "Params",
    "add",
    "any_requires_grad",
    "check_like",
    "check_tensor_dict",
    "detach",
    "detach_requires_grad",
    "dot",
    "flatten",
    "numel",
    "scale",
    "sub",
    "tree_flatten",
    "tree_map",
    "tree_unflatten",
    "unflatten",
    "zeros_like",
]
