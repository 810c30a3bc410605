"""What a training run is: its declared options (:class:`DataConfig`, :class:`TrainConfig`) and the
episode samplers built from them. The learner's own options are its ``Config``
(:class:`bilevel.learner.MetaLearner`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bilevel import options as opts
from bilevel.data import SinusoidTasks, available_datasets, load_splits, make_sampler
from bilevel.data.augment import AUGMENTATIONS, make_augmentation
from bilevel.data.omniglot import parse_holdout
from bilevel.data.transforms import example_shape as _example_shape
from bilevel.options import OptionError, option

if TYPE_CHECKING:
    from bilevel.learner import MetaLearner

__all__ = ["DataConfig", "PiecewiseLR", "Samplers", "TrainConfig", "build_samplers"]


@dataclass(frozen=True)
class DataConfig:
    """Which episodes to train and evaluate on (declared options; see :mod:`bilevel.options`).

    ``data_root`` is stored as an absolute path, so a run's identity does not depend on the
    directory it was started from.
    """

    dataset: str = option("glyphs", help="omniglot, mini-imagenet, tiered-imagenet, cifar-fs, fc100, sinusoid or "
                          "glyphs (offline).")
    data_root: str | None = option(None, help="Folder holding the dataset files.")
    ways: int = option(5, help="N classes per episode (test time).", min=2)
    shots: int = option(1, help="K support examples per class (test time).", min=1)
    queries: int = option(15, help="Q query examples per class.", min=1)
    train_shots: int | None = option(None, help="K at training time (default: --shots).", min=1)
    train_ways: int | None = option(None, help="N at training time (default: --ways).", min=2)
    meta_batch: int = option(4, help="Episodes per outer step.", min=1)
    augment: str = option("none", help="Training-image augmentation: metaoptnet (crop, flip, colour jitter; Lee et "
                          "al. 2019), affine (rotation, shear, scale, translation; Koch et al. 2015) or both.",
                          choices=AUGMENTATIONS)
    rotations: bool | None = option(None, help="Omniglot: 90° rotations as new classes.")
    split_by: str | None = option(None, help="Omniglot class split.", choices=("alphabet", "character"))
    within_alphabet: bool = option(False, help="Validation and test episodes draw their N classes from one alphabet "
                                   "(Omniglot; Lake et al. 2015's within-alphabet protocol); training episodes do not. "
                                   "With --holdout only the test episodes do.")
    holdout: str | None = option(None, help="Omniglot, with --split-by alphabet: k/n trains on all alphabets but those "
                                 "of fold k of n (0-based; seeded) and tests on those; validation holds 20% of the "
                                 "training alphabets' characters (e.g. --holdout 0/4: 6 alphabets train, 2 test).")
    options: dict[str, Any] = option(default_factory=dict, help="Other dataset options (Python only).", cli=False)

    def __post_init__(self) -> None:
        opts.validate(self)
        if self.dataset not in available_datasets():
            raise OptionError("dataset", f"unknown dataset {self.dataset!r}; expected one of {', '.join(available_datasets())}")
        if self.data_root is not None:
            object.__setattr__(self, "data_root", str(Path(self.data_root).expanduser().resolve()))
        if (self.rotations is not None or self.split_by is not None) and self.dataset != "omniglot":
            raise OptionError("rotations" if self.rotations is not None else "split_by",
                              "--rotations/--split-by apply to --dataset omniglot only")
        if self.holdout is not None:
            if self.split_by != "alphabet":
                raise OptionError("holdout", "--holdout holds out whole alphabets: add --split-by alphabet")
            try:
                parse_holdout(self.holdout)
            except ValueError as e:
                raise OptionError("holdout", str(e)) from None

    def dataset_options(self) -> dict[str, Any]:
        out = dict(self.options)
        if self.rotations is not None:
            out["rotations"] = self.rotations
        if self.split_by is not None:
            out["split_by"] = self.split_by
        if self.holdout is not None:
            out["holdout"] = self.holdout
        return out


@dataclass(frozen=True)
class TrainConfig:
    """How to train (declared options). ``optimizer``, ``outer_lr`` and ``weight_decay`` left at
    ``None`` take the learner's ``train_defaults`` (Adam 1e-3 without weight decay unless the
    method says otherwise, e.g. MetaOptNet: SGD 0.1, 5e-4)."""

    iterations: int = option(1000, help="Outer steps.", min=1)
    optimizer: str | None = option(None, help="Outer optimizer (default per method).", choices=("adam", "sgd"))
    outer_lr: float | None = option(None, help="Outer learning rate (default per method).", min=0, min_open=True)
    momentum: float = option(0.9, help="SGD momentum (Nesterov).", min=0, max=1, max_open=True)
    weight_decay: float | None = option(None, help="Outer weight decay (default per method).", min=0)
    lr_schedule: opts.Schedule = option(default_factory=list, help="Piecewise factors of the outer learning rate, "
                                        "e.g. 2000:0.1,4000:0.01.")
    grad_clip: float | None = option(None, help="Clip the meta-gradient norm.", min=0, min_open=True)
    val_every: int = option(500, help="Validate every this many iterations.", min=1)
    val_episodes: int = option(100, help="Validation episodes.", min=1)
    test_episodes: int = option(600, help="Test episodes at the end.", min=1)
    checkpoint_every: int = option(100, help="Checkpoint period in iterations.", min=1)
    log_every: int = option(10, help="Training-log period in iterations.", min=1, cli=False)
    seed: int = option(0, help="Seeds the initialisation and the episode streams.")
    device: str = option("cpu", help="cpu, cuda, cuda:1, …")
    threads: int | None = option(None, help="torch CPU threads (default: torch's).", min=1)
    task_threads: int = option(1, help="Split each meta-batch over this many CPU threads (one learner replica each).",
                               min=1)
    progress: bool = option(True, help="Show a progress bar.")
    tensorboard: bool = option(True, help="Also log TensorBoard events.")
    out: str = option("runs/bilevel", help="Output folder.", cli=False)

    def __post_init__(self) -> None:
        opts.validate(self)

    def resolved(self, learner_cls: type[MetaLearner]) -> TrainConfig:
        """This config with the method's defaults filled in."""
        d = {"optimizer": "adam", "outer_lr": 1e-3, "weight_decay": 0.0, **learner_cls.train_defaults}
        return dataclasses.replace(self, **{k: getattr(self, k) if getattr(self, k) is not None else d[k]
                                            for k in ("optimizer", "outer_lr", "weight_decay")})


class PiecewiseLR:
    """``TrainConfig.lr_schedule`` as a LambdaLR multiplier: the factor of the last entry whose iteration is reached."""

    def __init__(self, schedule: list[tuple[int, float]]) -> None:
        self.schedule = sorted((int(i), float(f)) for i, f in schedule)

    def __call__(self, it: int) -> float:
        factor = 1.0
        for start, f in self.schedule:
            if it >= start:
                factor = f
        return factor


@dataclass
class Samplers:
    train: Any
    val: Any
    test: Any
    example_shape: list[int]
    transform: dict[str, Any]
    task: str


def build_samplers(data: DataConfig, seed: int, splits: tuple[str, ...] = ("train", "val", "test")) -> Samplers:
    """Load the dataset splits once and build the train/val/test episode samplers.

    The three samplers use distinct episode streams derived from ``seed``; the validation and
    test episodes are the same in every run with that seed.
    """
    ds = load_splits(data.dataset, data.data_root, splits, **data.dataset_options())
    first = ds[splits[0]]
    regression = isinstance(first, SinusoidTasks)
    ways = None if regression else data.ways
    train_ways = None if regression else (data.train_ways or data.ways)
    augment = None if regression else make_augmentation(data.augment, int(first.images.shape[-1]))
    out: dict[str, Any] = {}
    for split in splits:
        if split == "train":
            out[split] = make_sampler(ds[split], ways=train_ways, shots=data.train_shots or data.shots,
                                      queries=data.queries, meta_batch=data.meta_batch, seed=seed, augment=augment)
        else:  # evaluation streams are indexed by episode (meta_batch 1): independent of --meta-batch
            out[split] = make_sampler(ds[split], ways=ways, shots=data.shots, queries=data.queries,
                                      meta_batch=1, seed=seed + {"val": 1, "test": 2}[split],
                                      within_alphabet=data.within_alphabet and (split == "test" or not data.holdout))
    spec = first.transform
    shape = list(_example_shape(spec)) if not regression else [1]
    return Samplers(out.get("train"), out.get("val"), out.get("test"), shape, dict(spec),
                    "regression" if regression else "classification")
