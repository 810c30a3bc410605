"""Which episodes a run trains and evaluates on: :class:`DataConfig` and the samplers built from it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bilevel import options as opts
from bilevel.data import SinusoidTasks, available_datasets, load_splits, make_sampler
from bilevel.data.augment import Augment
from bilevel.data.transforms import example_shape as _example_shape
from bilevel.options import OptionError, option

__all__ = ["DataConfig", "Samplers", "build_samplers"]


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
    augment: bool = option(False, help="Crop/flip/colour-jitter training images (MetaOptNet).")
    rotations: bool | None = option(None, help="Omniglot: 90° rotations as new classes.")
    split_by: str | None = option(None, help="Omniglot class split.", choices=("alphabet", "character"))
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

    def dataset_options(self) -> dict[str, Any]:
        out = dict(self.options)
        if self.rotations is not None:
            out["rotations"] = self.rotations
        if self.split_by is not None:
            out["split_by"] = self.split_by
        return out


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
    augment = Augment.metaoptnet(int(first.images.shape[-1])) if data.augment and not regression else None
    out: dict[str, Any] = {}
    for split in splits:
        if split == "train":
            out[split] = make_sampler(ds[split], ways=train_ways, shots=data.train_shots or data.shots,
                                      queries=data.queries, meta_batch=data.meta_batch, seed=seed, augment=augment)
        else:  # evaluation streams are indexed by episode (meta_batch 1): independent of --meta-batch
            out[split] = make_sampler(ds[split], ways=ways, shots=data.shots, queries=data.queries,
                                      meta_batch=1, seed=seed + {"val": 1, "test": 2}[split])
    spec = first.transform
    shape = list(_example_shape(spec)) if not regression else [1]
    return Samplers(out.get("train"), out.get("val"), out.get("test"), shape, dict(spec),
                    "regression" if regression else "classification")
