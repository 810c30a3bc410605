"""Few-shot backbones: Conv-4, ResNet-12 (MetaOptNet), and the sinusoid MLP.

All backbones are ordinary ``nn.Module``s meant to be called functionally,
``torch.func.functional_call(model, params, (x,))``; with the default ``bn="task"`` policy they
hold no buffers, so such calls are pure (the module is never mutated) and vmap-safe.
Every backbone maps ONE batch [M, C, H, W] (or [M, in_features]) to features [M, out_features]
and exposes ``out_features``. Extra keyword arguments of ``forward`` (``step`` for per-step
BatchNorm, ``drop_rate`` for ResNet-12) pass through ``functional_call(..., kwargs=...)``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from bilevel.models.layers import BN_POLICIES, DropBlock, apply_norm, make_norm

__all__ = [
    "MLP",
    "Conv4",
    "ResNet12",
    "available_backbones",
    "build_backbone",
    "conv4",
    "mlp",
    "resnet12",
]


def activation_layout(x: Tensor) -> Tensor:
    """``x`` (same values) in the memory format the backbones keep their activations in.

    Invariant: the result equals ``x``; only the layout changes. On CPU it is the contiguous
    (NCHW) format: PyTorch's CPU BatchNorm kernel for ``channels_last`` inputs (torch 2.x)
    accumulates the batch statistics and the backward sums serially in float32, one addition
    per example and pixel (N·H·W of them per channel and thread), which loses ~1e-5 relative
    precision on a 28×28 Omniglot batch where the contiguous kernel accumulates in float64
    (~1e-7). Through the max-pooling windows (near-ties are common on Omniglot's flat
    background) that error flipped pooling decisions and made float32 MAML meta-gradients ~1%
    wrong on one intra-op thread (``tests/test_float32_accuracy.py``). On accelerators the
    activations stay ``channels_last`` as before (the accuracy study above is CPU-only), except
    inside torch.func transforms, whose batched tensors do not support memory formats.
    """
    if x.dim() != 4:
        return x
    if x.device.type == "cpu":
        return x.contiguous()
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    if wrapped is not None and wrapped(x):
        return x
    return x.contiguous(memory_format=torch.channels_last)


def _check_images(x: Tensor, c: int, name: str, episodes: int | None = None) -> None:
    if x.ndim != 4 or x.shape[1] != c:
        raise ValueError(
            f"{name} expects one batch of images [M, {c}, H, W], got {tuple(x.shape)}; "
            "for several tasks flatten them and pass episodes=E, or use torch.func.vmap"
        )
    if episodes is not None and (episodes < 1 or x.shape[0] % episodes):
        raise ValueError(f"{name}: episodes={episodes} does not divide the batch of {x.shape[0]} images")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _size(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return (image_size, image_size)
    h, w = image_size
    return (int(h), int(w))


class Conv4(nn.Module):
    """Conv-4 embedding (Vinyals et al. 2016; Snell et al. 2017; Finn et al. 2017).

    Four blocks of [3x3 conv (``filters``), BatchNorm, ReLU, 2x2 max-pool] (``pool="max"``),
    or MAML's Omniglot variant with stride-2 convolutions and no pooling (``pool="stride"``).
    Output: flattened features [M, filters * h4 * w4]; 64 for 28x28 and 1600 for 84x84 with
    64 filters and max-pooling. ``filters=32`` is the variant of Ravi & Larochelle (2017) and
    Franceschi et al. (2018) on miniImageNet (800 features at 84x84).

    Args:
        in_channels: image channels (1 Omniglot, 3 ImageNet/CIFAR).
        filters: channels of every conv layer (64 or 32).
        image_size: input side (or (H, W)); only used to compute ``out_features``.
        pool: ``"max"`` or ``"stride"``.
        bn: BatchNorm policy, see :mod:`bilevel.models.layers`.
        bn_steps: number of inner steps for ``bn="per_step"``.
        n_classes: if given, a linear head to ``n_classes`` logits is appended (MAML).
    """

    def __init__(
        self,
        in_channels: int = 3,
        filters: int = 64,
        image_size: int | Sequence[int] = 84,
        pool: str = "max",
        bn: str = "task",
        bn_steps: int = 1,
        n_classes: int | None = None,
    ) -> None:
        super().__init__()
        _check_choice("pool", pool, ("max", "stride"))
        _check_choice("bn", bn, BN_POLICIES)
        self.in_channels = in_channels
        self.pool = pool
        stride = 2 if pool == "stride" else 1
        chans = [in_channels, filters, filters, filters, filters]
        self.convs = nn.ModuleList(
            nn.Conv2d(chans[i], chans[i + 1], 3, stride=stride, padding=1) for i in range(4)
        )
        self.norms = nn.ModuleList(make_norm(bn, filters, bn_steps) for _ in range(4))
        h, w = _size(image_size)
        for _ in range(4):
            h, w = ((h + 1) // 2, (w + 1) // 2) if pool == "stride" else (h // 2, w // 2)
        if min(h, w) < 1:
            raise ValueError(f"image_size {image_size} is too small for 4 down-sampling blocks")
        self.feature_dim = filters * h * w
        self.head = nn.Linear(self.feature_dim, n_classes) if n_classes else None
        self.out_features = n_classes if n_classes else self.feature_dim
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, step: int | None = None, episodes: int | None = None) -> Tensor:
        """[M, C, H, W] -> [M, out_features]; ``step`` selects per-step BatchNorm parameters.

        ``episodes=E``: x holds E episodes of M/E images each, normalised per episode (one
        pass through the shared weights embeds a whole meta-batch; see
        :func:`bilevel.models.layers.apply_norm`). Activations are kept in the layout of
        :func:`activation_layout`: contiguous on CPU (accurate float32 BatchNorm),
        ``channels_last`` on accelerators.
        """
        _check_images(x, self.in_channels, "Conv4", episodes)
        x = activation_layout(x)
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            h = conv(x)
            if i == 0:
                h = activation_layout(h)
            x = apply_norm(norm, h, step, episodes).relu()
            if self.pool == "max":
                x = nn.functional.max_pool2d(x, 2)
        x = x.flatten(1)
        return self.head(x) if self.head is not None else x


class _ResBlock(nn.Module):
    def __init__(self, cin: int, planes: int, bn: str, bn_steps: int, block_size: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, padding=1, bias=False)
        self.bn1 = make_norm(bn, planes, bn_steps)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = make_norm(bn, planes, bn_steps)
        self.conv3 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn3 = make_norm(bn, planes, bn_steps)
        self.shortcut = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn_short = make_norm(bn, planes, bn_steps)
        self.drop = DropBlock(block_size)

    def forward(self, x: Tensor, step: int | None, drop_rate: float, episodes: int | None = None) -> Tensor:
        act = nn.functional.leaky_relu
        out = act(apply_norm(self.bn1, self.conv1(x), step, episodes), 0.1)
        out = act(apply_norm(self.bn2, self.conv2(out), step, episodes), 0.1)
        out = apply_norm(self.bn3, self.conv3(out), step, episodes)
        out = act(out + apply_norm(self.bn_short, self.shortcut(x), step, episodes), 0.1)
        return self.drop(nn.functional.max_pool2d(out, 2), drop_rate)


class ResNet12(nn.Module):
    """ResNet-12 of MetaOptNet (Lee et al. 2019, section 4.1), without global pooling.

    ``R64-MP-DB(0.9,1)-R160-MP-DB(0.9,1)-R320-MP-DB(0.9,b)-R640-MP-DB(0.9,b)`` where each
    R_k is three {3x3 conv k, BatchNorm, LeakyReLU(0.1)} with a 1x1-conv shortcut, MP a 2x2
    max-pool and DB(keep, b) DropBlock; b = 5 for ImageNet derivatives, 2 for CIFAR
    derivatives (``variant="cifar"``). Output: flattened [M, 640 * h * w] = 16000 at 84x84 and
    2560 at 32x32.

    Args:
        in_channels: image channels.
        image_size: input side; default 84 (``variant="imagenet"``) or 32 (``"cifar"``).
        variant: ``"imagenet"`` or ``"cifar"``.
        channels: widths of the four stages.
        drop_rate: 1 - keep rate of DropBlock (0.1 in MetaOptNet); can be overridden per call
            with ``forward(x, drop_rate=...)`` to schedule it without mutating the module.
        bn, bn_steps: BatchNorm policy (see :mod:`bilevel.models.layers`).
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int | Sequence[int] | None = None,
        variant: str = "imagenet",
        channels: Sequence[int] = (64, 160, 320, 640),
        drop_rate: float = 0.1,
        bn: str = "task",
        bn_steps: int = 1,
    ) -> None:
        super().__init__()
        _check_choice("variant", variant, ("imagenet", "cifar"))
        _check_choice("bn", bn, BN_POLICIES)
        if len(channels) != 4:
            raise ValueError(f"channels must list 4 stage widths, got {channels}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        big = 5 if variant == "imagenet" else 2
        blocks = (1, 1, big, big)
        self.in_channels = in_channels
        self.drop_rate = drop_rate
        cins = [in_channels, *channels[:3]]
        self.blocks = nn.ModuleList(
            _ResBlock(cins[i], channels[i], bn, bn_steps, blocks[i]) for i in range(4)
        )
        h, w = _size(image_size if image_size is not None else (84 if variant == "imagenet" else 32))
        for _ in range(4):
            h, w = h // 2, w // 2
        if min(h, w) < 1:
            raise ValueError(f"image_size {image_size} is too small for ResNet-12 (4 poolings)")
        self.out_features = channels[3] * h * w
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, x: Tensor, step: int | None = None, drop_rate: float | None = None,
                episodes: int | None = None) -> Tensor:
        """[M, C, H, W] -> [M, out_features]; ``episodes=E``: per-episode BatchNorm statistics
        (see :meth:`Conv4.forward`); activations in the layout of :func:`activation_layout`."""
        _check_images(x, self.in_channels, "ResNet12", episodes)
        rate = self.drop_rate if drop_rate is None else drop_rate
        x = activation_layout(x)
        for blk in self.blocks:
            x = blk(x, step, rate, episodes)
        return x.flatten(1)


class MLP(nn.Module):
    """Fully connected network; default 1 -> 40 -> 40 -> 1 with ReLU (MAML sinusoid, sec. 5.1).

    Args:
        in_features: input width.
        out_features: output width.
        hidden: hidden widths.
        activation: ``"relu"``, ``"tanh"`` or ``"gelu"``.
    """

    def __init__(self, in_features: int = 1, out_features: int = 1,
                 hidden: Sequence[int] = (40, 40), activation: str = "relu") -> None:
        super().__init__()
        acts: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}
        if activation not in acts:
            raise ValueError(f"activation must be one of {sorted(acts)}, got {activation!r}")
        widths = [in_features, *hidden, out_features]
        layers: list[nn.Module] = []
        for i in range(len(widths) - 1):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if i < len(widths) - 2:
                layers.append(acts[activation]())
        self.net = nn.Sequential(*layers)
        self.in_features = in_features
        self.out_features = out_features

    def forward(self, x: Tensor) -> Tensor:
        """[M, in_features] -> [M, out_features]."""
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"MLP expects [M, {self.in_features}], got {tuple(x.shape)}")
        return self.net(x)


def conv4(in_channels: int = 3, filters: int = 64, image_size: int | Sequence[int] = 84,
          **kw: Any) -> Conv4:
    """Conv-4 backbone (see :class:`Conv4`); ``filters=32`` for the Ravi/Franceschi variant."""
    return Conv4(in_channels, filters, image_size, **kw)


def resnet12(in_channels: int = 3, image_size: int | Sequence[int] | None = None,
             variant: str = "imagenet", **kw: Any) -> ResNet12:
    """ResNet-12 of MetaOptNet (see :class:`ResNet12`); ``variant="cifar"`` for CIFAR-FS/FC100."""
    return ResNet12(in_channels, image_size, variant, **kw)


def mlp(in_features: int = 1, out_features: int = 1, hidden: Sequence[int] = (40, 40),
        **kw: Any) -> MLP:
    """The sinusoid MLP (see :class:`MLP`)."""
    return MLP(in_features, out_features, hidden, **kw)


_BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "conv4": conv4,
    "conv4-32": lambda **kw: conv4(**{"filters": 32, **kw}),
    "resnet12": resnet12,
    "resnet12-cifar": lambda **kw: resnet12(**{"variant": "cifar", **kw}),
    "mlp": mlp,
}


def available_backbones() -> list[str]:
    """Names accepted by :func:`build_backbone`."""
    return sorted(_BACKBONES)


def build_backbone(name: str, **kw: Any) -> nn.Module:
    """Build a backbone by name (``conv4``, ``conv4-32``, ``resnet12``, ``resnet12-cifar``,
    ``mlp``) with the factory's keyword arguments; the result has ``out_features``."""
    key = name.strip().lower().replace("_", "-")
    if key not in _BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; available: {available_backbones()}")
    return _BACKBONES[key](**kw)
