"""ANIL: Almost No Inner Loop (Raghu, Raghu, Bengio, Vinyals, ICLR 2020, "Rapid Learning or Feature Reuse?").

MAML with the inner loop restricted to the network's head: the body f_θ (all layers but the
last) is shared by the tasks and meta-learned *through* the adaptation of the head, whose
initialisation w_0 is meta-learned too (§4, "ANIL"). For episode j with support features
z = f_θ(x_support) the inner problem is the head's

    w_t = w_{t−1} − α ∇_w L(w_{t−1}; z, y_support),   L = cross-entropy (or squared error),

from w_0, and the meta-loss is the query loss of the adapted head on f_θ(x_query). In the
vocabulary of :func:`bilevel.solve`: params = the head {weight, bias} (w_0 = the meta-learned
head, differentiated like MAML's initialisation), hparams = the support features (functions of
the body's parameters θ), so every unrolled strategy (reverse, first-order, truncated:K,
checkpointed:K, forward) gives the body and the head their meta-gradient. The features are
computed once per episode, not at every inner step: that, and a second-order term over the
head only, is what makes ANIL fast.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import bilevel as bl
from bilevel.learner import MetaLearner
from bilevel.options import OptionError, option
from learners.common import StepSizeConfig, episode_features, make_network, summed_task_losses


@dataclass(frozen=True)
class ANILConfig(StepSizeConfig):
    """ANIL's options: MAML's, with the inner loop over the head only."""

    inner_lr: float = option(0.4, help="Inner step size α of the head (fixed; may differ at test time).", min=0,
                             min_open=True, eval=True,
                             paper="Raghu et al. 2020 keep MAML's: 0.4 (Omniglot), 0.01 (sinusoid)")


class ANIL(MetaLearner):
    """ANIL (Raghu et al. 2020): MAML whose inner loop adapts the head only; the body is meta-learned through it.

    Invariant: the meta-loss is 1/B Σ_j E(w_T^j f_θ(x_query^j)) with w_T^j the head after T
    steps of gradient descent from w_0 on (f_θ(x_support^j), y_support^j), solved by
    :func:`bilevel.solve` with params = head, hparams = support features; its gradient w.r.t.
    (θ, w_0) is the hypergradient of ``config.hypergrad``. With the full network's inner loop
    replaced by the head's, this is MAML (:class:`learners.maml.MAML`) with the body frozen
    during adaptation.

    The network is MAML's: a backbone without its last layer (Conv-4 for images, the sinusoid
    MLP 1 → 40 → 40 with ReLU for vectors) and a linear head to ``ways`` logits (or one output).
    Options (:class:`ANILConfig`): ``inner_steps``, ``eval_steps``, ``inner_lr`` (MAML's
    defaults), ``hypergrad`` (reverse, first-order, truncated:K, checkpointed:K, forward; the
    implicit forms and no-inner are refused: the head's initialisation gets no meta-gradient
    from them), ``batch_tasks`` (``auto``/``always``: the B heads as one batched problem — they
    are linear, so this is cheap on every device; ``never``, and ``auto`` with ``forward``:
    one solve per task), and the backbone options.

    Attributes:
        body: the feature extractor f_θ ([n, *example_shape] -> [n, d]).
        head: ``nn.Linear(d, ways)`` (or ``(d, 1)``): the meta-learned head initialisation w_0.
    """

    Config = ANILConfig

    def __init__(self, *, example_shape: Sequence[int], ways: int | None, config: Any = None, **options: Any) -> None:
        super().__init__(example_shape=example_shape, ways=ways, config=config, **options)
        c = self.config
        self.task = "regression" if ways is None else "classification"
        body = make_network(c.backbone or ("mlp" if ways is None else "conv4"), example_shape, ways,
                            c.network_options(), head=False)
        # MAML's sinusoid network is 1 -> 40 -> ReLU -> 40 -> ReLU -> 1: the body ends in the ReLU
        self.body = nn.Sequential(body, nn.ReLU()) if ways is None else body
        self.head = nn.Linear(body.out_features, ways or 1)
        self.inner_steps = c.inner_steps
        self.eval_steps = c.eval_steps if c.eval_steps is not None else c.inner_steps
        self.strategy = c.hypergrad
        self.problem = bl.BilevelProblem(self.inner_loss, self.inner_loss)

    def check_ways(self, n_way: int) -> None:
        if self.ways is not None and n_way > self.ways:
            raise OptionError("ways", f"this ANIL has a {self.ways}-way head; it cannot classify {n_way} classes "
                              f"(use at most {self.ways} ways)")

    def features(self, x: Tensor) -> Tensor:
        """f_θ(x) for B episodes: [B, n, *example_shape] -> [B, n, d]."""
        return episode_features(self.body, x)

    @staticmethod
    def predict_heads(params: dict[str, Tensor], features: Tensor) -> Tensor:
        """The B heads on their features: weight [B, N, d], bias [B, N], features [B, n, d] -> [B, n, N]."""
        return features @ params["weight"].mT + params["bias"].unsqueeze(1)

    def inner_loss(self, params: dict[str, Tensor], hparams: dict[str, Tensor], targets: Tensor) -> Tensor:
        """Σ_j L(w_j; z_j, y_j) with z = ``hparams["features"]`` [B, n, d] (per-task mean loss, summed)."""
        return summed_task_losses(self.predict_heads(params, hparams["features"]), targets, self.task)

    def adapt_heads(self, features: Tensor, targets: Tensor, steps: int) -> dict[str, Tensor]:
        """The B adapted heads {weight [B, N, d], bias [B, N]} after ``steps`` GD steps from w_0.

        ``batch_tasks="never"`` (and ``"auto"`` with ``Forward()``, whose cost grows with the
        number of differentiated entries) solves one task at a time: the same result, the summed
        loss being block-diagonal in the heads.
        """
        dynamics = bl.GradientDescent(lr=self.config.inner_lr)
        mode = self.config.batch_tasks
        # forward mode carries one tangent per differentiated entry: B times more when the tasks are stacked
        per_task = mode == "never" or (mode == "auto" and isinstance(self.strategy, bl.Forward))
        if per_task and features.shape[0] > 1:
            heads = [self.adapt_heads(features[j:j + 1], targets[j:j + 1], steps) for j in range(features.shape[0])]
            return {k: torch.cat([h[k] for h in heads]) for k in heads[0]}
        b = features.shape[0]
        params0 = {k: v.expand(b, *v.shape) for k, v in self.head.named_parameters()}
        return bl.solve(self.problem, params0, {"features": features}, targets, dynamics=dynamics, steps=steps,
                        hypergrad=self.strategy)

    def forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *, train: bool = True) -> Tensor:
        heads = self.adapt_heads(self.features(support_x), support_y, self.inner_steps if train else self.eval_steps)
        return self.predict_heads(heads, self.features(query_x))


__all__ = ["ANIL", "ANILConfig"]
