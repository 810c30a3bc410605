"""The meta-learner protocol shared by every method in ``learners/`` and the training loop."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bilevel import options as opts
from bilevel.data.sampler import Episodes

TASKS = ("classification", "regression")


@dataclass(frozen=True)
class LearnerConfig:
    """Base of every learner's declared options (a frozen dataclass of :func:`bilevel.options.option`
    fields); validated on construction, so a config object is always a valid one."""

    def __post_init__(self) -> None:
        opts.validate(self)


class MetaLearner(nn.Module):
    """Base class of meta-learners: outer variables are this module's parameters.

    A meta-learner maps a batch of episodes to query predictions by adapting to each support
    set (the inner problem), and exposes the meta-loss whose gradient w.r.t. its parameters is
    the hypergradient (the outer problem; Franceschi et al. 2018, eq. (3.1)):

        f(λ) = 1/B Σ_j E(adapt(D_tr^j; λ), D_val^j),

    with λ = ``self.parameters()``. Subclasses implement :meth:`forward`; they may override
    :meth:`query_loss` (e.g. label smoothing, learned scale) and :meth:`meta_loss` (e.g.
    methods that do not split support/query). Module state (BatchNorm buffers) must not change
    during :meth:`forward`: the inner loops are functional (``torch.func.functional_call``).

    Every learner declares its options once, as a :class:`LearnerConfig` subclass assigned to
    the class attribute ``Config`` (fields made with :func:`bilevel.options.option`): Python
    construction, the command line (``bilevel <name> train``), config files and model files all
    use that declaration. Construct with keyword options (``MAML(example_shape=[1, 28, 28],
    ways=5, inner_lr=0.4)``) or with a ready ``config=MAML.Config(...)``.

    Args:
        example_shape: per-example input shape, e.g. [C, H, W] or [D] (filled in by the loop).
        ways: N classes for classification, ``None`` for regression.
        config: a ``Config`` instance (instead of keyword options).
        **options: the fields of ``Config``.

    Attributes:
        task: ``"classification"`` or ``"regression"``.
        config: the validated ``Config`` instance.
        example_shape, ways: as given.
    """

    #: the declared options of this learner (a frozen dataclass; see bilevel.options)
    Config: ClassVar[type] = LearnerConfig
    #: training-loop defaults of this method for unset TrainConfig fields (optimizer, outer_lr, weight_decay)
    train_defaults: ClassVar[Mapping[str, Any]] = {}
    task: str = "classification"

    def __init__(self, *, example_shape: Sequence[int], ways: int | None, config: Any = None, **options: Any) -> None:
        super().__init__()
        if config is None:
            names = {f.name for f in dataclasses.fields(self.Config)}
            unknown = sorted(k for k in options if k not in names)
            if unknown:
                raise opts.OptionError(unknown[0], f"{type(self).__name__} has no option {unknown[0]!r}; its options are "
                                       f"{', '.join(sorted(names))}")
            config = self.Config(**options)
        elif options:
            raise TypeError(f"{type(self).__name__}: pass either config= or keyword options, not both ({sorted(options)})")
        if not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__} needs config of type {self.Config.__name__}, got {type(config).__name__}")
        if isinstance(ways, bool) or (ways is not None and (not isinstance(ways, int) or ways < 2)):
            raise opts.OptionError("ways", f"ways must be an integer >= 2 for classification (or None for regression), got {ways!r}")
        self.config = config
        self.example_shape = [int(s) for s in example_shape]
        self.ways = ways

    def to_json(self) -> dict[str, Any]:
        """What rebuilds this learner (without its tensors): JSON-able; inverse of :meth:`from_json`."""
        return {"example_shape": list(self.example_shape), "ways": self.ways, "options": opts.to_json(self.config)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> MetaLearner:
        """Rebuild a learner written by :meth:`to_json` (fresh parameters), with optional option overrides
        (text or Python values, validated like command-line values)."""
        if not isinstance(data, Mapping) or not {"example_shape", "ways", "options"} <= set(data):
            raise ValueError(f"{cls.__name__}: a learner description needs example_shape, ways and options; got {data!r}")
        values = dict(data["options"])
        if overrides:
            names = {f.name for f, _, _ in opts.declared(cls.Config)}
            unknown = sorted(k for k in overrides if k not in names)
            if unknown:
                raise opts.OptionError(unknown[0], f"{unknown} are not options of {cls.__name__} (it has {sorted(names)})")
            values.update(overrides)
        config = opts.from_json(cls.Config, values, where=cls.__name__)
        return cls(example_shape=data["example_shape"], ways=data["ways"], config=config)

    def check_ways(self, n_way: int) -> None:
        """Raise :class:`bilevel.options.OptionError` (option ``ways``) if this learner cannot classify
        ``n_way`` classes. Default: any number (heads built per episode); learners with a fixed
        output layer override it."""

    @classmethod
    def summary(cls) -> str:
        """One line describing the method (the first line of the class docstring)."""
        return (cls.__doc__ or cls.__name__).strip().splitlines()[0]

    def forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *, train: bool = True) -> Tensor:  # noqa: D401
        """Predictions for the queries of B episodes.

        Args:
            support_x: [B, n_support, *example_shape]; support_y: [B, n_support] int64 in
                0..N−1 (classification) or [B, n_support, out] float (regression).
            query_x: [B, n_query, *example_shape].
            train: training-time behaviour (e.g. inner steps, shot) versus test-time.

        Returns:
            logits [B, n_query, N] (classification) or predictions [B, n_query, out].
        """
        raise NotImplementedError

    def query_loss(self, pred: Tensor, query_y: Tensor) -> Tensor:
        """Per-episode outer loss E on the queries: [B] (cross-entropy or mean squared error)."""
        if self.task == "regression":
            return ((pred - query_y) ** 2).flatten(1).mean(1)
        b, q, n = pred.shape
        return F.cross_entropy(pred.reshape(b * q, n), query_y.reshape(b * q), reduction="none").reshape(b, q).mean(1)

    def metric(self, pred: Tensor, query_y: Tensor) -> Tensor:
        """Per-episode metric [B]: accuracy in [0, 1] (classification) or MSE (regression)."""
        if self.task == "regression":
            return ((pred.detach() - query_y) ** 2).flatten(1).mean(1)
        return (pred.detach().argmax(-1) == query_y).float().mean(1)

    def meta_loss(self, episodes: Episodes, *, train: bool = True) -> tuple[Tensor, Tensor]:
        """The meta-loss (mean over the B episodes) and the per-episode metric [B]."""
        pred = self(episodes.support_x, episodes.support_y, episodes.query_x, train=train)
        return self.query_loss(pred, episodes.query_y).mean(), self.metric(pred, episodes.query_y)

    def predict_episode(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, n_way: int | None) -> Tensor:
        """Predictions for one episode (the :class:`bilevel.io.FewShotLearner` protocol)."""
        with torch.no_grad():
            return self(support_x[None], support_y[None], query_x[None], train=False)[0]


def n_way_of(support_y: Tensor) -> int:
    """The number of classes N of a batch of classification episodes (labels 0..N−1)."""
    return int(support_y.max()) + 1


__all__ = ["LearnerConfig", "MetaLearner", "TASKS", "n_way_of"]
