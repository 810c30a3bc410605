"""Few-shot backbones, used functionally through ``torch.func.functional_call``.

See :mod:`bilevel.models.layers` for the BatchNorm policy of inner loops (``bn="task"`` by
default: batch statistics per task, no buffers, pure and vmap-safe).
"""
from bilevel.models.backbones import (
    MLP,
    Conv4,
    ResNet12,
    available_backbones,
    build_backbone,
    conv4,
    mlp,
    resnet12,
)
from bilevel.models.layers import BN_POLICIES, DropBlock, PerStepBatchNorm2d

__all__ = [
    "BN_POLICIES",
    "MLP",
    "Conv4",
    "DropBlock",
    "PerStepBatchNorm2d",
    "ResNet12",
    "available_backbones",
    "build_backbone",
    "conv4",
    "mlp",
    "resnet12",
]
