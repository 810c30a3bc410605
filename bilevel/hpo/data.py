"""Data for the hyperparameter-optimization tasks: MNIST or scikit-learn's digits, split three ways.

The bilevel problem of hyperparameter optimization needs three disjoint sets (Franceschi et al.
2018, §2): D_tr for the inner objective L, D_val for the outer objective E, and a held-out test
set to check that what was tuned on D_val generalises. Every loader here returns features as a
float32 matrix ``x`` [N, D] scaled to [0, 1] and integer labels ``y`` [N].

Sources, in the order ``mnist`` looks for them under ``data_root``:

* ``mnist10k.npz`` (or ``data_root`` itself naming an ``.npz`` file) with arrays ``images``
  (uint8 [N, 28, 28]) and ``labels`` [N];
* torchvision's MNIST layout ``data_root/MNIST/raw/*-ubyte`` (train and test sets pooled), and a
  download by torchvision only when ``download=True`` is asked for explicitly;

and ``digits`` is scikit-learn's bundled 8×8 digits (1797 examples), which needs no file at all.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from bilevel.options import OptionError  # the one OptionError; re-exported for bilevel.hpo users

DATASETS = ("digits", "mnist")
MNIST_FILE = "mnist10k.npz"


class Split(NamedTuple):
    """One labelled set: features ``x`` [n, D] (float) and labels ``y`` [n] (int64)."""

    x: Tensor
    y: Tensor


class TaskData(NamedTuple):
    """The three disjoint sets of a hyperparameter-optimization problem.

    Attributes:
        train: D_tr, seen by the inner objective (possibly with corrupted labels).
        val: D_val, seen by the outer objective.
        test: held out; only reported.
        num_classes: number of classes K (labels are in 0..K-1).
        name: the dataset name (``"digits"`` or ``"mnist"``).
    """

    train: Split
    val: Split
    test: Split
    num_classes: int
    name: str


def _load_npz(path: Path) -> tuple[Tensor, Tensor]:
    try:
        archive = np.load(path)
    except Exception as e:  # a truncated or foreign file: say which, keep the cause
        raise ValueError(f"{path}: cannot read it as an .npz archive ({type(e).__name__}: {e})") from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: holds a single array, not an .npz archive with 'images' and 'labels'")
    with archive:
        missing = [k for k in ("images", "labels") if k not in archive.files]
        if missing:
            raise ValueError(f"{path}: missing array(s) {missing} (found {sorted(archive.files)}); expected 'images' [N, 28, 28] and 'labels' [N]")
        images, labels = archive["images"], archive["labels"]
    if images.ndim < 2 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{path}: 'images' has shape {list(images.shape)} and 'labels' {list(labels.shape)}; "
            "expected images [N, H, W] and labels [N] with the same N"
        )
    x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32))
    scale = 255.0 if images.dtype == np.uint8 or float(x.max(initial=0.0)) > 1.0 else 1.0
    return x / scale, torch.from_numpy(labels.astype(np.int64))


def _torchvision_mnist(root: Path, download: bool) -> tuple[Tensor, Tensor]:
    from torchvision.datasets import MNIST  # lazy: torchvision is heavy to import

    try:
        parts = [MNIST(str(root), train=train, download=download) for train in (True, False)]
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise OptionError("data_root", f"torchvision could not load MNIST from {root / 'MNIST' / 'raw'}: {e}") from e
    x = torch.cat([p.data.reshape(len(p.data), -1) for p in parts]).float() / 255.0
    y = torch.cat([p.targets for p in parts]).long()
    return x, y


def find_mnist(data_root: str | Path | None, *, download: bool = False) -> Path:
    """Where MNIST is under ``data_root``: the ``.npz`` file, or the folder holding ``MNIST/raw``.

    Raises:
        OptionError: (option ``data_root``) when ``data_root`` is missing or holds neither
            ``mnist10k.npz`` nor torchvision's MNIST files, unless ``download`` is set.
    """
    if data_root is None:
        raise OptionError("data_root", "dataset 'mnist' needs --data-root: a folder holding mnist10k.npz or torchvision's MNIST/raw")
    root = Path(data_root).expanduser()
    if root.is_file():
        if root.suffix != ".npz":
            raise OptionError("data_root", f"data root {root} is a file but not an .npz archive")
        return root
    if not root.exists() and not download:
        raise OptionError("data_root", f"data root {root} does not exist")
    if (root / MNIST_FILE).is_file():
        return root / MNIST_FILE
    raw = root / "MNIST" / "raw"
    if download or (raw.is_dir() and any(raw.glob("*-ubyte*"))):
        return root
    raise OptionError(
        "data_root",
        f"no MNIST under {root}: expected {root / MNIST_FILE} (arrays 'images', 'labels') or torchvision's "
        f"{raw}; pass download=True (--download) to let torchvision fetch it",
    )


def load_dataset(name: str = "digits", data_root: str | Path | None = None, *, download: bool = False) -> tuple[Tensor, Tensor, int]:
    """Load a whole classification dataset as (x, y, num_classes).

    Args:
        name: ``"digits"`` (scikit-learn's 8×8 digits, offline) or ``"mnist"`` (from ``data_root``).
        data_root: folder with ``mnist10k.npz`` or torchvision's ``MNIST/raw`` (or an ``.npz`` path).
        download: allow torchvision to download MNIST into ``data_root`` when it is absent.

    Returns:
        ``x`` float32 [N, D] in [0, 1] (D = 64 for digits, 784 for MNIST), ``y`` int64 [N], and K.

    Raises:
        OptionError: unknown ``name``, or MNIST not found (see :func:`find_mnist`).
    """
    if name == "digits":
        from sklearn.datasets import load_digits  # lazy: scikit-learn is slow to import

        d = load_digits()
        x = torch.tensor(d.data, dtype=torch.float32) / 16.0
        return x, torch.tensor(d.target, dtype=torch.int64), 10
    if name != "mnist":
        raise OptionError("dataset", f"unknown dataset {name!r}; expected one of {list(DATASETS)}")
    where = find_mnist(data_root, download=download)
    x, y = _load_npz(where) if where.suffix == ".npz" else _torchvision_mnist(where, download)
    return x, y, 10


def split_dataset(
    x: Tensor,
    y: Tensor,
    n_train: int,
    n_val: int,
    n_test: int,
    *,
    generator: torch.Generator,
    num_classes: int | None = None,
    name: str = "data",
) -> TaskData:
    """Shuffle (x, y) with ``generator`` and cut disjoint train / val / test sets.

    Invariant: the three index sets are disjoint and drawn from one random permutation.

    Args:
        x: features [N, D]; y: labels [N].
        n_train, n_val, n_test: sizes (n_train ≥ 1, n_val ≥ 1, n_test ≥ 0, sum ≤ N).
        generator: the CPU generator that draws the permutation (the seed of the split).
        num_classes: K (default: max label + 1).
        name: dataset name used in messages.

    Returns:
        A :class:`TaskData`.

    Raises:
        OptionError: an empty training or validation set, or more examples asked than there are.
    """
    for opt, n, low in (("n_train", n_train, 1), ("n_val", n_val, 1), ("n_test", n_test, 0)):
        if isinstance(n, bool) or not isinstance(n, int):
            raise OptionError(opt, f"{opt} must be an int, got {type(n).__name__}")
        if n < low:
            what = {"n_train": "training", "n_val": "validation", "n_test": "test"}[opt]
            raise OptionError(opt, f"the {what} set is empty ({opt}={n}); it needs at least {low} example")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]} labels")
    total = n_train + n_val + n_test
    if total > len(y):
        raise OptionError(
            "n_train",
            f"n_train + n_val + n_test = {n_train} + {n_val} + {n_test} = {total} examples, but {name} has only {len(y)}",
        )
    perm = torch.randperm(len(y), generator=generator)
    cuts = np.cumsum([0, n_train, n_val, n_test])
    parts = [Split(x[perm[a:b]], y[perm[a:b]]) for a, b in zip(cuts[:-1], cuts[1:])]
    k = int(y.max()) + 1 if num_classes is None else num_classes
    return TaskData(parts[0], parts[1], parts[2], k, name)


def corrupt_labels(y: Tensor, fraction: float, num_classes: int, *, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Flip the labels of a random ``fraction`` of the examples to a different, uniformly drawn class.

    Invariant: exactly round(fraction·n) labels change, each to a class ≠ the true one.

    Args:
        y: labels [n] in 0..K-1.
        fraction: share of labels to flip, in [0, 1).
        num_classes: K ≥ 2.
        generator: CPU generator choosing which labels flip and to what.

    Returns:
        ``(y_noisy, corrupted)``: the new labels [n] and a bool mask [n] of the flipped examples.

    Raises:
        OptionError: (option ``corrupt_fraction``) when ``fraction`` is outside [0, 1).

    Reference: Franceschi et al. (2017), §5.1 (data hyper-cleaning).
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= float(fraction) < 1.0:
        raise OptionError("corrupt_fraction", f"corrupt fraction must be in [0, 1), got {fraction!r}")
    if num_classes < 2:
        raise ValueError(f"corrupt_labels needs num_classes >= 2, got {num_classes}")
    n = len(y)
    corrupted = torch.zeros(n, dtype=torch.bool)
    corrupted[torch.randperm(n, generator=generator)[: round(float(fraction) * n)]] = True
    shift = torch.randint(1, num_classes, (n,), generator=generator)
    y_cpu = y.cpu()
    noisy = torch.where(corrupted, (y_cpu + shift) % num_classes, y_cpu)
    return noisy.to(y.device), corrupted.to(y.device)


def minibatches(split: Split, batch_size: int, steps: int, *, generator: torch.Generator) -> Callable[[int], tuple[Tensor, Tensor]]:
    """A batch function ``t -> (x_B, y_B)`` for t = 1..steps, for :func:`bilevel.solve`.

    Each B_t is drawn uniformly with replacement from ``split`` (mini-batches B_t ⊂ D_tr of
    Franceschi et al. 2018, eq. (2.1)); the whole set when ``batch_size >= len(split.y)``.
    The indices are drawn once, up front, so calling the function twice with the same t gives
    the same batch (as Checkpointed's recomputation and reproducible runs need).

    Args:
        split: the training set.
        batch_size: |B_t| ≥ 1.
        steps: the number of steps the function must serve.
        generator: the CPU generator drawing the indices.

    Returns:
        A function of t in 1..steps; any other t raises ``ValueError``.
    """
    if batch_size < 1:
        raise OptionError("batch_size", f"batch size must be >= 1, got {batch_size}")
    n = len(split.y)
    if batch_size >= n:
        full = (split.x, split.y)

        def whole(t: int) -> tuple[Tensor, Tensor]:
            if not 1 <= t <= steps:
                raise ValueError(f"batch requested for step {t}, outside 1..{steps}")
            return full

        return whole
    idx = torch.randint(0, n, (steps, batch_size), generator=generator).to(split.y.device)

    def batch(t: int) -> tuple[Tensor, Tensor]:
        if not 1 <= t <= steps:
            raise ValueError(f"batch requested for step {t}, outside 1..{steps}")
        i = idx[t - 1]
        return split.x[i], split.y[i]

    return batch


def to_device(data: TaskData, device: torch.device | str) -> TaskData:
    """Move every tensor of ``data`` to ``device``."""
    move = lambda s: Split(s.x.to(device), s.y.to(device))  # noqa: E731
    return data._replace(train=move(data.train), val=move(data.val), test=move(data.test))


__all__ = [
    "DATASETS",
    "MNIST_FILE",
    "OptionError",
    "Split",
    "TaskData",
    "corrupt_labels",
    "find_mnist",
    "load_dataset",
    "minibatches",
    "split_dataset",
    "to_device",
]
