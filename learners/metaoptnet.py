"""MetaOptNet (Lee et al. 2019): meta-learning with differentiable convex base learners.

The learner embeds an episode with a backbone f_φ, fits a convex base learner ("head") on the
support embeddings and scores the queries with it, times a learnable scale γ (eq. 12). The heads
live in :mod:`learners.heads`; :data:`HEADS` maps the names the learner accepts to them.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bilevel.learner import MetaLearner, n_way_of
from bilevel.options import OptionError, option
from learners.common import BackboneConfig, make_network
from learners.heads import proto_head, r2d2_head, ridge_head, smooth_labels, svm_cs_head

__all__ = ["HEADS", "MetaOptNet", "MetaOptNetConfig"]

HEADS = {"svm": svm_cs_head, "ridge": ridge_head, "r2d2": r2d2_head, "proto": proto_head}


@dataclass(frozen=True)
class MetaOptNetConfig(BackboneConfig):
    """MetaOptNet's options (Lee et al. 2019, §4.1 for the paper's values)."""

    head: str = option("svm", help="Convex base learner: svm (Crammer–Singer), ridge, r2d2 or proto.",
                       choices=("svm", "ridge", "r2d2", "proto"))
    C: float = option(0.1, help="SVM regularisation C.", min=0, min_open=True, paper="Lee et al. 2019: 0.1")
    lam: float = option(50.0, help="Ridge/R2D2 regularisation λ.", min=0, min_open=True, paper="Lee et al. 2019: 50")
    label_smoothing: float = option(0.0, help="Label smoothing ε of the meta-loss (1−ε on the label).", min=0, max=1,
                                    max_open=True, paper="Lee et al. 2019: 0.1 (miniImageNet, ResNet-12)")
    max_iter: int | None = option(None, help="SVM head: stop the QP solver after N iterations during meta-training "
                                  "(default: solve exactly); whose iterate is set by --early-stop. MetaOptNet: 15 with "
                                  "--early-stop qpth.", min=1)
    eval_max_iter: int | None = option(None, help="SVM head: stop the QP solver after N iterations at validation and "
                                       "test (default: solve exactly). MetaOptNet: 3 with --early-stop qpth.", min=1,
                                       eval=True)
    scale: float = option(1.0, help="Initial value of the learnable logit scale γ.", min=0, min_open=True)
    early_stop: str = option("native", help="What --max-iter/--eval-max-iter stop. qpth: MetaOptNet's early stopping, "
                             "exactly the point qpth reaches after that many iterations on kron(K, I) + 1.0·I, with "
                             "qpth's gradient (qpth is not needed). native: this package's interior-point method cut "
                             "off after that many iterations; its early iterates are not MetaOptNet's. No effect without "
                             "an iteration count.", choices=("native", "qpth"), eval=True,
                             paper="Lee et al. 2019, §4.1: qpth, 15 iterations (training), 3 (test)")


class MetaOptNet(MetaLearner):
    """MetaOptNet (Lee et al. 2019): differentiable convex heads on a backbone.

    Episodes are classified by a convex base learner on f_φ(x). Invariant: logits =
    γ · head(f_φ(query), f_φ(support), labels) with the head's classifier
    the argmin of a convex problem on the support embeddings (SVM-CS dual, ridge, R2D2) or the
    class means (ProtoNet); the meta-loss is the (label-smoothed) query cross-entropy, eq. (12),
    and its gradient w.r.t. φ and γ flows through the head by implicit differentiation of its
    optimality (KKT) conditions (eq. 5–8). The meta-training shot may exceed the test shot
    (``--train-shots``, §4.1). Options: :class:`MetaOptNetConfig` (``backbone``: ``conv4``
    (default), ``conv4-32``, ``resnet12``, ``resnet12-cifar``). ``max_iter``/``eval_max_iter``
    ``None`` (default) solve the SVM dual exactly; an integer stops the solver, and ``early_stop``
    says whose iterate that is: ``"native"`` (default) the native interior-point method cut off
    (a cap, not the paper's), ``"qpth"`` MetaOptNet's early stopping (§4.1; its code: 15 iterations
    at training, 3 at test): qpth's PDIPM iterate on ``kron(K, I) + 1.0 I``, reproduced without
    qpth (see :func:`learners.heads.svm_cs_head`).

    Reference: K. Lee, S. Maji, A. Ravichandran, S. Soatto. *Meta-Learning with Differentiable
    Convex Optimization*, CVPR 2019.
    """

    Config = MetaOptNetConfig
    train_defaults = {"optimizer": "sgd", "outer_lr": 0.1, "weight_decay": 5e-4}

    def __init__(self, *, example_shape: Sequence[int], ways: int | None, config: Any = None, **options: Any) -> None:
        super().__init__(example_shape=example_shape, ways=ways, config=config, **options)
        if ways is None:
            raise OptionError("dataset", "MetaOptNet is a classification learner; the sinusoid needs a regression "
                              "learner (e.g. maml)")
        c = self.config
        self.embed = make_network(c.backbone or "conv4", example_shape, ways, c.network_options(), head=False)
        self._episodes_arg = "episodes" in inspect.signature(self.embed.forward).parameters
        self.scale = nn.Parameter(torch.tensor(float(c.scale)))
        self.head = c.head
        self.label_smoothing = c.label_smoothing

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
        c = self.config
        if self.head == "svm":
            it = c.max_iter if train else c.eval_max_iter
            return {"C": c.C, "max_iter": it, "early_stop": c.early_stop if it else "native"}
        if self.head in ("ridge", "r2d2"):
            return {"lam": c.lam}
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
