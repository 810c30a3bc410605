"""Seeded, batched training augmentation for episodes (crop, flip, colour jitter, affine distortions).

An augmentation is a pair (optax style): ``sample_params(n, generator) -> params`` draws the
random parameters of ``n`` images from an explicit generator, ``apply(x, params) -> x`` is a
pure function of them. The sampler draws each episode's parameters from that episode's own
generator and applies them in one batched call, so augmented episodes stay reproducible and
rank-independent. Images are floats in [0, 1] [M, C, H, W] (before mean/std standardisation).

:class:`Augment` reimplements torchvision's RandomCrop(padding), RandomHorizontalFlip and
ColorJitter(brightness, contrast, saturation) per image, batched (same formulas as
``torchvision.transforms.v2.functional.adjust_*``; tested against them), with one deviation:
the jitter order is fixed (brightness, contrast, saturation) instead of random.
:class:`Affine` draws Koch et al. (2015)'s affine distortions (rotation, shear, scale,
translation, each switched on with probability ½) and applies them to the whole batch with one
``affine_grid`` / ``grid_sample`` call. :class:`Compose` chains augmentations.
:class:`TorchvisionAugment` wraps any torchvision transform (per image, seeded).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["AUGMENTATIONS", "Affine", "Augment", "Augmentation", "Compose", "TorchvisionAugment", "make_augmentation"]

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


@dataclass(frozen=True)
class Affine:
    """Random affine distortions, batched (Koch, Zemel, Salakhutdinov 2015, §3.2 "Affine distortions").

    Each image gets ``T = R(θ) · Sh(ρx, ρy) · diag(sx, sy)`` plus a translation (tx, ty) about its
    centre, with θ ~ U[−rotation, rotation] degrees, ρ ~ U[−shear, shear], s ~ U[1 − scale, 1 + scale],
    t ~ U[−translation, translation] pixels; each of the seven components is used with probability
    ``p`` (else it is the identity), as in the paper. Pixels are resampled bilinearly; what enters
    from outside the image is 0 (the background of the stroke datasets, which are stored inverted).

    Args:
        rotation: degrees (paper: 10). shear: paper 0.3. scale: paper 0.2 (s in [0.8, 1.2]).
        translation: pixels at the image's size (paper: 2, at 105 px). p: paper 0.5.
    """

    rotation: float = 10.0
    shear: float = 0.3
    scale: float = 0.2
    translation: float = 2.0
    p: float = 0.5

    def __post_init__(self) -> None:
        for nm in ("rotation", "shear", "scale", "translation"):
            v = getattr(self, nm)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"Affine {nm} must be a finite number >= 0, got {v!r}")
        if not 0 <= self.scale < 1:
            raise ValueError(f"Affine scale must be in [0, 1), got {self.scale!r}")
        if not 0 <= self.p <= 1:
            raise ValueError(f"Affine p must be in [0, 1], got {self.p!r}")

    def sample_params(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        def u(lo: float, hi: float) -> Tensor:
            return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)

        draws = {"theta": u(-self.rotation, self.rotation) * math.pi / 180, "shear_x": u(-self.shear, self.shear),
                 "shear_y": u(-self.shear, self.shear), "scale_x": u(1 - self.scale, 1 + self.scale),
                 "scale_y": u(1 - self.scale, 1 + self.scale), "shift_x": u(-self.translation, self.translation),
                 "shift_y": u(-self.translation, self.translation)}
        identity = {"scale_x": 1.0, "scale_y": 1.0}
        return {k: torch.where(torch.rand(n, generator=generator) < self.p, v, torch.full_like(v, identity.get(k, 0.0)))
                for k, v in draws.items()}

    def matrices(self, params: dict[str, Tensor], height: int, width: int) -> Tensor:
        """The [M, 2, 3] sampling matrices of ``F.affine_grid`` (output → input, normalised coordinates)."""
        c, s = params["theta"].cos(), params["theta"].sin()
        one, zero = torch.ones_like(c), torch.zeros_like(c)
        rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
        shear = torch.stack([torch.stack([one, params["shear_x"]], -1), torch.stack([params["shear_y"], one], -1)], -2)
        scale = torch.stack([torch.stack([params["scale_x"], zero], -1), torch.stack([zero, params["scale_y"]], -1)], -2)
        forward = rot @ shear @ scale  # image -> distorted image
        inverse = torch.linalg.inv(forward)
        shift = torch.stack([params["shift_x"] * 2 / width, params["shift_y"] * 2 / height], -1)
        return torch.cat([inverse, -(inverse @ shift[..., None])], -1)

    def apply(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        m, _, h, w = x.shape
        theta = self.matrices(params, h, w).to(device=x.device, dtype=x.dtype)
        grid = F.affine_grid(theta, [m, x.shape[1], h, w], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@dataclass(frozen=True)
class Compose:
    """Augmentations applied in order (each draws its own parameters)."""

    parts: tuple[Any, ...]

    def sample_params(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        return {f"{i}.{k}": v for i, a in enumerate(self.parts) for k, v in a.sample_params(n, generator).items()}

    def apply(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        for i, a in enumerate(self.parts):
            x = a.apply(x, {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith(f"{i}.")})
        return x


#: the augmentations the command line offers (``--augment NAME``)
AUGMENTATIONS = ("none", "metaoptnet", "affine", "metaoptnet+affine")


def make_augmentation(name: str, image_size: int) -> Augmentation | None:
    """The augmentation called ``name`` (one of :data:`AUGMENTATIONS`) for images of ``image_size`` pixels.

    ``affine`` scales Koch et al.'s 2-pixel translation from their 105-px images to ``image_size``.
    """
    if name not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {name!r}")
    affine = Affine(translation=2.0 * image_size / 105)
    return {"none": None, "metaoptnet": Augment.metaoptnet(image_size), "affine": affine,
            "metaoptnet+affine": Compose((affine, Augment.metaoptnet(image_size)))}[name]


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
