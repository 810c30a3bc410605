"""Seeded, batched training augmentation for episodes (random crop, flip, colour jitter).

An augmentation is a pair (optax style): ``sample_params(n, generator) -> params`` draws the
random parameters of ``n`` images from an explicit generator, ``apply(x, params) -> x`` is a
pure function of them. The sampler draws each episode's parameters from that episode's own
generator and applies them in one batched call, so augmented episodes stay reproducible and
rank-independent. Images are floats in [0, 1] [M, C, H, W] (before mean/std standardisation).

:class:`Augment` reimplements torchvision's RandomCrop(padding), RandomHorizontalFlip and
ColorJitter(brightness, contrast, saturation) per image, batched (same formulas as
``torchvision.transforms.v2.functional.adjust_*``; tested against them), with one deviation:
the jitter order is fixed (brightness, contrast, saturation) instead of random.
:class:`TorchvisionAugment` wraps any torchvision transform (per image, seeded).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["Augment", "Augmentation", "TorchvisionAugment"]

_GRAY = (0.2989, 0.587, 0.114)


@runtime_checkable
class Augmentation(Protocol):
    """Seeded batched augmentation: ``apply(x, sample_params(len(x), generator))``."""

    def sample_params(self, n: int, generator: torch.Generator) -> dict[str, Tensor]: ...

    def apply(self, x: Tensor, params: dict[str, Tensor]) -> Tensor: ...


def _grayscale(x: Tensor) -> Tensor:
    if x.shape[-3] == 1:
        return x
    r, g, b = x.unbind(-3)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(-3)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1.0 - f) * other).clamp_(0.0, 1.0)


@dataclass(frozen=True)
class Augment:
    """Per-image random crop with zero padding, horizontal flip and colour jitter, batched.

    Args:
        crop_padding: pad by this many pixels and crop back to the original size at a uniform
            random offset (torchvision ``RandomCrop(size, padding=p)``); 0 disables.
        flip: horizontal flip with probability 1/2.
        brightness, contrast, saturation: jitter strengths ``s``; factors ~ U[max(0, 1-s), 1+s].
    """

    crop_padding: int = 0
    flip: bool = False
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0

    def __post_init__(self) -> None:
        if self.crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {self.crop_padding}")
        for nm in ("brightness", "contrast", "saturation"):
            if getattr(self, nm) < 0:
                raise ValueError(f"{nm} must be >= 0, got {getattr(self, nm)}")

    @classmethod
    def metaoptnet(cls, image_size: int = 84) -> Augment:
        """MetaOptNet's training augmentation: crop (padding 8 at 84 px, 4 at 32 px), flip,
        jitter 0.4 (Lee et al. 2019, section 4.1)."""
        return cls(crop_padding=8 if image_size > 32 else 4, flip=True,
                   brightness=0.4, contrast=0.4, saturation=0.4)

    def sample_params(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        p: dict[str, Tensor] = {}
        if self.crop_padding:
            p["crop"] = torch.randint(0, 2 * self.crop_padding + 1, (n, 2), generator=generator)
        if self.flip:
            p["flip"] = torch.rand(n, generator=generator) < 0.5
        for nm in ("brightness", "contrast", "saturation"):
            s = getattr(self, nm)
            if s:
                lo = max(0.0, 1.0 - s)
                p[nm] = lo + (1.0 + s - lo) * torch.rand(n, generator=generator)
        return p

    def apply(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        if "crop" in params:
            pad = self.crop_padding
            m, c, h, w = x.shape
            xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
            off = params["crop"].to(x.device)
            rows = (off[:, 0:1] + torch.arange(h, device=x.device)).view(m, 1, h, 1)
            cols = (off[:, 1:2] + torch.arange(w, device=x.device)).view(m, 1, 1, w)
            idx_m = torch.arange(m, device=x.device).view(m, 1, 1, 1)
            idx_c = torch.arange(c, device=x.device).view(1, c, 1, 1)
            x = xp[idx_m, idx_c, rows, cols]
        if "flip" in params:
            x = torch.where(params["flip"].to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)
        if "brightness" in params:
            x = (x * params["brightness"].to(x).view(-1, 1, 1, 1)).clamp_(0.0, 1.0)
        if "contrast" in params:
            mean = _grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
            x = _blend(x, mean, params["contrast"].to(x))
        if "saturation" in params and x.shape[-3] == 3:
            x = _blend(x, _grayscale(x), params["saturation"].to(x))
        return x


class TorchvisionAugment:
    """Wrap any tensor transform (e.g. a ``torchvision.transforms.v2.Compose``) as a seeded
    augmentation: each image gets its own seed, and the transform runs per image under
    ``torch.random.fork_rng`` with the global RNG seeded from it (slower than :class:`Augment`).

    Args:
        transform: callable float image [C, H, W] -> [C, H', W'] (output sizes must agree).
    """

    def __init__(self, transform: Callable[[Tensor], Tensor]) -> None:
        if not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        self.transform = transform

    def __repr__(self) -> str:
        return f"TorchvisionAugment({self.transform!r})"

    def sample_params(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        return {"seed": torch.randint(0, 2**62, (n,), generator=generator)}

    def apply(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        out = []
        with torch.random.fork_rng(devices=[]):
            for img, seed in zip(x, params["seed"].tolist()):
                torch.manual_seed(seed)
                out.append(self.transform(img))
        return torch.stack(out)


def concat_params(parts: list[dict[str, Any]]) -> dict[str, Tensor]:
    """Concatenate per-episode parameter dicts along the image dimension."""
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}
