"""Building blocks shared by the backbones: BatchNorm policies and DropBlock.

BatchNorm policy for inner loops (argument ``bn`` of every backbone factory):

* ``"task"`` (default) -- batch statistics per task: ``BatchNorm2d(track_running_stats=False)``
  normalises every call by the statistics of the batch it is given (one task's support or
  query set), in train and eval mode alike. There are no buffers, so
  ``functional_call(model, params, x)`` is pure and ``torch.func.vmap`` over tasks keeps the
  statistics of different tasks separate (MAML's transductive setting).
* ``"per_step"`` -- MAML++ (Antoniou et al. 2019, "BNWB"): one (gamma, beta) pair per inner
  step, selected by ``forward(x, step=t)``; statistics are the batch's own (as ``"task"``), the
  per-step running statistics of MAML++ ("BNRS") are deliberately omitted to stay pure.
* ``"running"`` -- ordinary ``BatchNorm2d`` with running statistics (for non-episodic
  pre-training). Impure in train mode: a forward pass updates the buffers.
* ``"none"`` -- no normalisation.

Inputs are always one batch [M, C, H, W] of ONE task: never merge tasks into one batch under
``"task"``/``"per_step"`` (their statistics would mix); use ``vmap`` over the task dimension.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BN_POLICIES", "DropBlock", "PerStepBatchNorm2d", "make_norm"]

BN_POLICIES = ("task", "per_step", "running", "none")


class PerStepBatchNorm2d(nn.Module):
    """BatchNorm with batch statistics and a separate affine (gamma, beta) per inner step.

    Invariant: ``forward(x, step=t) = gamma[t] * (x - mean_b(x)) / sqrt(var_b(x) + eps) + beta[t]``
    with the batch mean/variance over (M, H, W). MAML++ (Antoniou et al. 2019), BNWB.

    Args:
        num_features: channels C.
        steps: number of inner steps with their own affine parameters.
        eps: variance epsilon.
    """

    def __init__(self, num_features: int, steps: int, eps: float = 1e-5) -> None:
        super().__init__()
        if steps < 1:
            raise ValueError(f"per-step BatchNorm needs steps >= 1, got {steps}")
        self.steps = steps
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(steps, num_features))
        self.bias = nn.Parameter(torch.zeros(steps, num_features))

    def forward(self, x: Tensor, step: int = 0) -> Tensor:
        if not 0 <= step < self.steps:
            raise ValueError(f"step={step} outside 0..{self.steps - 1} (bn_steps)")
        return F.batch_norm(x, None, None, self.weight[step], self.bias[step], True, 0.0, self.eps)


def make_norm(bn: str, channels: int, steps: int = 1) -> nn.Module:
    """The normalisation layer of policy ``bn`` (see the module docstring)."""
    if bn == "task":
        return nn.BatchNorm2d(channels, track_running_stats=False)
    if bn == "per_step":
        return PerStepBatchNorm2d(channels, steps)
    if bn == "running":
        return nn.BatchNorm2d(channels)
    if bn == "none":
        return nn.Identity()
    raise ValueError(f"bn must be one of {BN_POLICIES}, got {bn!r}")


def apply_norm(norm: nn.Module, x: Tensor, step: int | None, episodes: int | None = None) -> Tensor:
    """Call ``norm`` (with ``step`` if it is per-step).

    ``episodes=E`` says that the batch [E·n, C, H, W] holds E episodes of n examples each:
    the ``"task"``/``"per_step"`` policies then normalise every episode by its own statistics
    (the same values as E separate calls), so that one forward pass through shared weights can
    embed a whole meta-batch. ``"running"`` BatchNorm ignores it (whole-batch statistics).
    """
    if isinstance(norm, PerStepBatchNorm2d):
        s = 0 if step is None else step
        if episodes is not None and episodes > 1:
            return episode_batch_norm(x, episodes, norm.weight[s], norm.bias[s], norm.eps)
        return norm(x, s)
    if episodes is not None and episodes > 1 and isinstance(norm, nn.BatchNorm2d) and not norm.track_running_stats:
        return episode_batch_norm(x, episodes, norm.weight, norm.bias, norm.eps)
    return norm(x)


def episode_batch_norm(x: Tensor, episodes: int, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """Batch normalisation with separate statistics for each of ``episodes`` equal slices of x.

    Invariant: equals ``torch.cat([F.batch_norm(t, None, None, weight, bias, True, 0, eps)
    for t in x.chunk(episodes)])`` for x [E·n, C, H, W] (biased variance, as BatchNorm).
    """
    m = x.shape[0]
    if m % episodes:
        raise ValueError(f"a batch of {m} examples cannot hold {episodes} episodes of equal size")
    # one fused batch_norm per episode (the slices keep the batch's memory format)
    return torch.cat([F.batch_norm(t, None, None, weight, bias, True, 0.0, eps) for t in x.split(m // episodes)])


class DropBlock(nn.Module):
    """DropBlock (Ghiasi et al. 2018): drop contiguous ``block_size`` x ``block_size`` regions.

    In training mode, block centres are sampled per (example, channel) with probability
    ``gamma = (drop_rate / b^2) * s^2 / (s - b + 1)^2`` on the valid ``(s - b + 1)^2`` positions,
    expanded to b x b blocks, and the kept activations are rescaled by ``numel / kept``
    (MetaOptNet's formulation). ``block_size = 1`` is element-wise dropout. Identity in eval
    mode or when ``drop_rate = 0``. Uses the global RNG, like ``nn.Dropout``; under ``vmap``
    pass ``randomness="different"``.

    Args:
        block_size: side b of the dropped blocks.
    """

    def __init__(self, block_size: int) -> None:
        super().__init__()
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size

    def forward(self, x: Tensor, drop_rate: float) -> Tensor:
        if not self.training or drop_rate <= 0.0:
            return x
        b = min(self.block_size, x.shape[-1], x.shape[-2])
        h, w = x.shape[-2:]
        gamma = drop_rate / (b * b) * (h * w) / ((h - b + 1) * (w - b + 1))
        centres = torch.bernoulli(
            torch.full((*x.shape[:-2], h - b + 1, w - b + 1), gamma, dtype=x.dtype, device=x.device)
        )
        pad = b - 1
        block = F.max_pool2d(
            F.pad(centres, (pad, pad, pad, pad)), kernel_size=b, stride=1
        ) if b > 1 else centres
        keep = 1.0 - block
        scale = keep.numel() / keep.sum().clamp_min(1.0)
        return x * keep * scale
