"""MetaOptNet (Lee et al. 2019): meta-learning with differentiable convex base learners.

The learner embeds an episode with a backbone f_φ, fits a convex base learner ("head") on the
support embeddings and scores the queries with it, times a learnable scale γ (eq. 12). The heads
live in :mod:`learners.heads`; :data:`HEADS` maps the names the learner accepts to them.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bilevel.learner import MetaLearner, n_way_of
from learners.common import make_network
from learners.heads import _positive, proto_head, r2d2_head, ridge_head, smooth_labels, svm_cs_head

__all__ = ["HEADS", "MetaOptNet"]

HEADS = {"svm": svm_cs_head, "ridge": ridge_head, "r2d2": r2d2_head, "proto": proto_head}


class MetaOptNet(MetaLearner):
    """MetaOptNet (Lee et al. 2019): episodes classified by a convex base learner on f_φ(x).

    Invariant: logits = γ · head(f_φ(query), f_φ(support), labels) with the head's classifier
    the argmin of a convex problem on the support embeddings (SVM-CS dual, ridge, R2D2) or the
    class means (ProtoNet); the meta-loss is the (label-smoothed) query cross-entropy, eq. (12),
    and its gradient w.r.t. φ and γ flows through the head by implicit differentiation of its
    optimality (KKT) conditions (eq. 5–8). The meta-training shot may exceed the test shot
    (``--train-shots``, §4.1).

    Args:
        example_shape: [C, H, W] (filled in by the training loop); ways: N (unused by the heads,
            which work for any N).
        backbone: ``conv4`` (default), ``conv4-32``, ``resnet12``, ``resnet12-cifar``.
        backbone_options: extra backbone kwargs (e.g. ``{"filters": 32}``).
        head: ``svm`` (Crammer–Singer), ``ridge``, ``r2d2`` or ``proto``.
        C: SVM regularisation (paper 0.1); lam: ridge/R2D2 regularisation (paper 50).
        label_smoothing: ε of the meta-loss (paper: 0.1 for miniImageNet with ResNet-12).
        max_iter, eval_max_iter: SVM solver iterations at training/test time; ``None`` (default)
            solves the SVM dual exactly. Whose iterate an integer returns is ``early_stop``'s.
        early_stop: ``"native"`` (default): the native interior-point method stopped after that
            many iterations (a cap; not the paper's). ``"qpth"``: MetaOptNet's early stopping
            (§4.1; its code: 15 iterations at training, 3 at test): qpth's PDIPM iterate on
            ``kron(K, I) + 1.0 I``, reproduced without qpth (see :func:`learners.heads.svm_cs_head`).
        scale: initial γ.

    Reference: K. Lee, S. Maji, A. Ravichandran, S. Soatto. *Meta-Learning with Differentiable
    Convex Optimization*, CVPR 2019.
    """

    def __init__(
        self,
        *,
        example_shape: Sequence[int],
        ways: int | None,
        backbone: str | None = None,
        backbone_options: dict[str, Any] | None = None,
        head: str = "svm",
        C: float = 0.1,
        lam: float = 50.0,
        label_smoothing: float = 0.0,
        max_iter: int | None = None,
        eval_max_iter: int | None = None,
        scale: float = 1.0,
        early_stop: str = "native",
    ) -> None:
        super().__init__()
        if ways is None:
            raise ValueError("MetaOptNet is a classification learner; the sinusoid needs a regression learner (e.g. maml)")
        if head not in HEADS:
            raise ValueError(f"head must be one of {sorted(HEADS)}, got {head!r}")
        _positive("C", C)
        _positive("lam", lam)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        for name, v in (("max_iter", max_iter), ("eval_max_iter", eval_max_iter)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be None or an integer >= 1, got {v!r}")
        if early_stop not in ("native", "qpth"):
            raise ValueError(f"early_stop must be 'native' or 'qpth', got {early_stop!r}")
        self.config = {
            "example_shape": list(example_shape), "ways": ways, "backbone": backbone,
            "backbone_options": dict(backbone_options or {}), "head": head, "C": float(C), "lam": float(lam),
            "label_smoothing": float(label_smoothing), "max_iter": max_iter, "eval_max_iter": eval_max_iter,
            "scale": float(scale), "early_stop": early_stop,
        }
        self.embed = make_network(backbone or "conv4", example_shape, ways, backbone_options, head=False)
        self._episodes_arg = "episodes" in inspect.signature(self.embed.forward).parameters
        self.scale = nn.Parameter(torch.tensor(float(scale)))
        self.head = head
        self.label_smoothing = float(label_smoothing)

    def embed_episodes(self, x: Tensor) -> Tensor:
        """f_φ(x) for B episodes [B, n, C, H, W] -> [B, n, d], BatchNorm statistics per episode.

        On CPU the episodes go through the network one at a time (cache-friendly); elsewhere in
        one pass with ``episodes=B``.
        """
        b, n = x.shape[:2]
        if x.device.type != "cpu" and self._episodes_arg:
            return self.embed(x.reshape(b * n, *x.shape[2:]), episodes=b).reshape(b, n, -1)
        return torch.stack([self.embed(x[j]) for j in range(b)])

    def head_options(self, train: bool) -> dict[str, Any]:
        if self.head == "svm":
            it = self.config["max_iter"] if train else self.config["eval_max_iter"]
            return {"C": self.config["C"], "max_iter": it, "early_stop": self.config["early_stop"] if it else "native"}
        if self.head in ("ridge", "r2d2"):
            return {"lam": self.config["lam"]}
        return {}

    def forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *, train: bool = True) -> Tensor:
        n_way = n_way_of(support_y)
        s = self.embed_episodes(support_x)
        q = self.embed_episodes(query_x)
        logits = HEADS[self.head](q, s, support_y, n_way, **self.head_options(train))
        return self.scale * logits

    def query_loss(self, pred: Tensor, query_y: Tensor) -> Tensor:
        """Per-episode (label-smoothed) cross-entropy of the scaled logits, eq. (12): [B]."""
        if not self.label_smoothing:
            return super().query_loss(pred, query_y)
        target = smooth_labels(query_y, pred.shape[-1], self.label_smoothing).to(pred.dtype)
        return -(target * F.log_softmax(pred, -1)).sum(-1).mean(1)
