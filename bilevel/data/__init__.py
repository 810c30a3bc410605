"""Few-shot data: in-memory datasets, pure episodic samplers, augmentation, eval transforms.

Quick start::

    from bilevel.data import load_dataset, EpisodeSampler
    train = load_dataset("omniglot", "/data", "train", rotations=True)   # or "glyphs" offline
    sampler = EpisodeSampler(train, ways=20, shots=5, queries=15, meta_batch=32, seed=0)
    episodes = sampler.sample(iteration)     # depends only on (seed, iteration, episode index)

Datasets: ``omniglot`` (official + reduced background sets), ``mini-imagenet`` (MetaOptNet
pickles or Ravi CSV + JPEG), ``tiered-imagenet``, ``cifar-fs``, ``fc100``, ``sinusoid`` and the
offline default ``glyphs`` (procedural; see :mod:`bilevel.data.synthetic`).
"""
from bilevel.data.augment import Affine, Augment, Augmentation, Compose, TorchvisionAugment, make_augmentation
from bilevel.data.base import (
    SPLITS,
    DatasetNotFoundError,
    FewShotDataset,
    available_datasets,
    default_cache_dir,
    load_dataset,
    load_splits,
    register_dataset,
)
from bilevel.data.sampler import EpisodePlan, EpisodeSampler, Episodes, SinusoidSampler, make_sampler
from bilevel.data.synthetic import SinusoidTasks
from bilevel.data.transforms import (
    TRANSFORM_PRESETS,
    EvalTransform,
    build_transform,
    example_shape,
    normalize,
    resolve_transform_spec,
)

# Register the file-based loaders (import for the side effect).
from bilevel.data import imagenet as _imagenet  # noqa: E402,F401
from bilevel.data import omniglot as _omniglot  # noqa: E402,F401

DEFAULT_DATASET = "glyphs"
"""The built-in offline dataset (no files, no download)."""

__all__ = [
    "DEFAULT_DATASET",
    "SPLITS",
    "TRANSFORM_PRESETS",
    "Affine",
    "Augment",
    "Augmentation",
    "Compose",
    "DatasetNotFoundError",
    "EpisodePlan",
    "EpisodeSampler",
    "Episodes",
    "EvalTransform",
    "FewShotDataset",
    "SinusoidSampler",
    "SinusoidTasks",
    "TorchvisionAugment",
    "make_augmentation",
    "available_datasets",
    "build_transform",
    "default_cache_dir",
    "example_shape",
    "load_dataset",
    "load_splits",
    "make_sampler",
    "normalize",
    "register_dataset",
    "resolve_transform_spec",
]
