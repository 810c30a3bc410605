"""Datasets that need no files: procedural ``glyphs`` (the offline default) and ``sinusoid``.

``glyphs`` -- the built-in offline default for demos and CI. Each class is a random "character"
made of 2-4 quadratic Bezier strokes; each of its examples redraws the strokes with jittered
control points, a small rotation and shift, like different people drawing one Omniglot
character. Images are 28x28 uint8, strokes 255 on 0 (the stored Omniglot convention), so
models and transforms built for Omniglot work unchanged. Class ``c`` depends only on
(``seed``, ``c``); train/val/test use disjoint class ids.

``sinusoid`` -- the regression tasks of MAML (Finn et al. 2017, section 5.1): amplitude
U[0.1, 5.0], phase U[0, pi], inputs x U[-5, 5], y = A sin(x - phase).
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bilevel.data.base import FewShotDataset, register_dataset
from bilevel.data.transforms import resolve_transform_spec

__all__ = ["SinusoidTasks", "load_glyphs", "load_sinusoid", "render_strokes", "seed_from"]

GLYPH_CLASSES = {"train": 320, "val": 80, "test": 160}


def seed_from(*parts: Any) -> int:
    """A 63-bit seed from a hash of ``parts`` (stable across processes and platforms)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def render_strokes(points: Tensor, mask: Tensor, size: int, width: float) -> Tensor:
    """Rasterise polylines: intensity ``clamp(1.5 - dist / width, 0, 1)`` to the nearest segment.

    Args:
        points: [M, S, P, 2] polyline vertices (x, y) in the unit square, S strokes of P points.
        mask: [M, S] bool, which strokes exist.
        size: output side in pixels.
        width: stroke half-width in unit-square coordinates.

    Returns:
        uint8 [M, 1, size, size].
    """
    m, s, p, _ = points.shape
    a = points[:, :, :-1].reshape(m, 1, -1, 2)
    ab = points[:, :, 1:].reshape(m, 1, -1, 2) - a
    ax, ay, abx, aby = a[..., 0], a[..., 1], ab[..., 0], ab[..., 1]  # [M, 1, L]
    c = (torch.arange(size, dtype=points.dtype) + 0.5) / size
    px = c.repeat(size).view(1, -1, 1)  # pixel centres, row-major: x varies fastest
    py = c.repeat_interleave(size).view(1, -1, 1)
    apx, apy = px - ax, py - ay  # [M, HW, L]
    t = ((apx * abx + apy * aby) / (abx * abx + aby * aby).clamp_min(1e-12)).clamp_(0, 1)
    dx, dy = apx - t * abx, apy - t * aby
    d2 = dx * dx + dy * dy
    d2 = d2.masked_fill(~mask.repeat_interleave(p - 1, dim=1)[:, None, :], float("inf"))
    d = d2.amin(-1).sqrt()
    img = (1.5 - d / width).clamp(0, 1).mul(255).round().to(torch.uint8)
    return img.reshape(m, 1, size, size)


def _glyph_class(seed: int, cls: int, n: int, size: int) -> Tensor:
    g = torch.Generator().manual_seed(seed_from("glyphs", seed, cls))
    n_strokes = int(torch.randint(2, 5, (1,), generator=g))
    proto = torch.rand(4, 3, 2, generator=g) * 0.7 + 0.15  # <= 4 strokes, 3 control points
    ctrl = proto[None] + 0.025 * torch.randn(n, 4, 3, 2, generator=g)
    ctrl = ctrl[:, :n_strokes]
    ts = torch.linspace(0, 1, 5)[:, None]  # 5 points per stroke -> 4 segments
    pts = ((1 - ts) ** 2) * ctrl[:, :, 0:1] + 2 * (1 - ts) * ts * ctrl[:, :, 1:2] + ts**2 * ctrl[:, :, 2:3]
    ang = (torch.rand(n, generator=g) - 0.5) * 0.35
    rot = torch.stack(
        [torch.stack([ang.cos(), -ang.sin()], -1), torch.stack([ang.sin(), ang.cos()], -1)], -2
    )
    shift = 0.06 * (torch.rand(n, 1, 1, 2, generator=g) - 0.5)
    pts = (pts - 0.5) @ rot.transpose(-1, -2)[:, None] + 0.5 + shift
    return render_strokes(pts, torch.ones(n, n_strokes, dtype=torch.bool), size, width=0.9 / size)


@register_dataset("glyphs", needs_root=False)
def load_glyphs(
    root: Path | None,
    splits: Sequence[str],
    *,
    classes: dict[str, int] | None = None,
    examples_per_class: int = 20,
    size: int = 28,
    seed: int = 0,
) -> dict[str, FewShotDataset]:
    """The built-in offline dataset: procedurally drawn glyph classes (no files, no download).

    Invariant: class ids of train are 0..n_train-1, val the next n_val, test the next n_test, so
    splits are disjoint; every image is a deterministic function of (seed, class, example).

    Args:
        root: ignored.
        splits: splits to return.
        classes: classes per split, default ``{"train": 320, "val": 80, "test": 160}``.
        examples_per_class: drawings per class (20, like Omniglot).
        size: image side.
        seed: generator seed of the whole dataset.

    Returns:
        ``{split: FewShotDataset}`` of uint8 [n_classes * examples_per_class, 1, size, size].
    """
    counts = dict(GLYPH_CLASSES, **(classes or {}))
    if any(int(v) < 1 for v in counts.values()) or examples_per_class < 1:
        raise ValueError(f"glyph classes and examples_per_class must be >= 1, got {counts}, {examples_per_class}")
    spec = resolve_transform_spec({"name": "glyphs", "size": int(size)})
    start = {"train": 0, "val": counts["train"], "test": counts["train"] + counts["val"]}
    out = {}
    for s in splits:
        ids = range(start[s], start[s] + int(counts[s]))
        images = torch.cat([_glyph_class(seed, c, examples_per_class, int(size)) for c in ids])
        labels = torch.arange(len(ids)).repeat_interleave(examples_per_class)
        out[s] = FewShotDataset(images, labels, tuple(f"glyph{c:05d}" for c in ids), "glyphs", s,
                                spec, {"seed": seed, "class_ids": [ids.start, ids.stop]})
    return out


@dataclass(frozen=True)
class SinusoidTasks:
    """The sinusoid task distribution of MAML section 5.1 (one object per split).

    y = amplitude * sin(x - phase), amplitude ~ U[amplitude], phase ~ U[phase], x ~ U[x_range].
    Splits share the distribution; the sampler draws them from different random streams.
    """

    split: str = "train"
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)
    name: str = "sinusoid"

    @property
    def transform(self) -> dict[str, Any]:
        return resolve_transform_spec({"name": "sinusoid"})

    @staticmethod
    def function(x: Tensor, amplitude: Tensor, phase: Tensor) -> Tensor:
        """y = amplitude * sin(x - phase), broadcasting amplitude/phase [B] over x [B, M, 1]."""
        return amplitude.view(-1, 1, 1) * torch.sin(x - phase.view(-1, 1, 1))


@register_dataset("sinusoid", needs_root=False)
def load_sinusoid(
    root: Path | None,
    splits: Sequence[str],
    *,
    amplitude: tuple[float, float] = (0.1, 5.0),
    phase: tuple[float, float] = (0.0, math.pi),
    x_range: tuple[float, float] = (-5.0, 5.0),
) -> dict[str, SinusoidTasks]:
    """Sinusoid regression task distributions (MAML 5.1); sample them with ``SinusoidSampler``."""
    for nm, (lo, hi) in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
        if not lo <= hi:
            raise ValueError(f"{nm} must be (low, high) with low <= high, got {(lo, hi)}")
    return {s: SinusoidTasks(s, tuple(amplitude), tuple(phase), tuple(x_range)) for s in splits}
