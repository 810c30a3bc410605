"""Small models and metrics for the HPO tasks, used functionally (``torch.func.functional_call``).

The module only describes the computation; its parameters live in a dict ``params`` (w) that the
inner dynamics updates, so ``functional_call(model, params, (x,))`` is the model's prediction at w.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from bilevel.hpo.data import Split


def logistic_regression(num_features: int, num_classes: int) -> nn.Linear:
    """Multinomial logistic regression: logits = x Wᵀ + b with W [K, D], b [K]."""
    return nn.Linear(num_features, num_classes)


def mlp(num_features: int, hidden: int, num_classes: int) -> nn.Sequential:
    """A one-hidden-layer tanh network D → hidden → K (keys ``0.weight``, ``0.bias``, ``2.weight``, ``2.bias``)."""
    return nn.Sequential(nn.Linear(num_features, hidden), nn.Tanh(), nn.Linear(hidden, num_classes))


def init_params(model: nn.Module, *, generator: torch.Generator | None = None, zeros: bool = False) -> dict[str, Tensor]:
    """Initial params w_0 for ``model``, drawn with ``generator`` (never the global RNG).

    Weight matrices get N(0, 1/fan_in) entries (zero with ``zeros=True``), everything else zeros.

    Args:
        model: the module whose parameter names and shapes to use (its own values are ignored).
        generator: CPU generator (required unless ``zeros``).
        zeros: all-zero initialisation (convex models: the inner problem has one minimiser).

    Returns:
        ``{name: tensor}`` on the device and dtype of the module's parameters, not requiring grad.
    """
    if not zeros and generator is None:
        raise ValueError("init_params needs a generator (or zeros=True)")
    out = {}
    for name, p in model.named_parameters():
        if zeros or p.ndim < 2:
            out[name] = torch.zeros_like(p, requires_grad=False)
        else:
            w = torch.randn(p.shape, generator=generator, dtype=p.dtype) / math.sqrt(p.shape[1])
            out[name] = w.to(p.device)
    return out


def cross_entropy_loss(model: nn.Module) -> Callable[[dict[str, Tensor], dict[str, Tensor], tuple[Tensor, Tensor]], Tensor]:
    """ℓ(w, λ; B) = mean cross-entropy of ``functional_call(model, w, x)`` on B = (x, y); λ unused.

    The unregularised loss: the outer objective E of every HPO task (and the inner one of ``lr``).
    """

    def loss(params: dict[str, Tensor], hparams: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    return loss


@torch.no_grad()
def evaluate(model: nn.Module, params: dict[str, Tensor], split: Split) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``functional_call(model, params, x)`` on ``split``.

    Returns:
        ``(loss, accuracy)`` as Python floats; ``(nan, nan)`` for an empty split.
    """
    if len(split.y) == 0:
        return float("nan"), float("nan")
    logits = functional_call(model, params, (split.x,))
    return float(F.cross_entropy(logits, split.y)), float((logits.argmax(1) == split.y).float().mean())


def f1_score(flagged: Tensor, positive: Tensor) -> tuple[float, float, float]:
    """Precision, recall and F1 of the boolean prediction ``flagged`` for the boolean truth ``positive``.

    F1 = 2·P·R / (P + R) with P = TP / #flagged and R = TP / #positive (0 where undefined).
    """
    if flagged.shape != positive.shape:
        raise ValueError(f"flagged has shape {list(flagged.shape)} but positive has {list(positive.shape)}")
    tp = float((flagged & positive).sum())
    precision = tp / float(flagged.sum()) if bool(flagged.any()) else 0.0
    recall = tp / float(positive.sum()) if bool(positive.any()) else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f1


__all__ = ["cross_entropy_loss", "evaluate", "f1_score", "init_params", "logistic_regression", "mlp"]
