"""In-memory few-shot datasets, the dataset registry, the decode cache and safe file readers.

Contract: a dataset split is decoded ONCE at load time into tensors held in memory
(:class:`FewShotDataset`); episodes only index into them, never decode files.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bilevel.data.transforms import resolve_transform_spec

__all__ = [
    "SPLITS",
    "DatasetNotFoundError",
    "FewShotDataset",
    "available_datasets",
    "default_cache_dir",
    "load_dataset",
    "load_splits",
    "register_dataset",
]

SPLITS = ("train", "val", "test")


class DatasetNotFoundError(FileNotFoundError):
    """The data root lacks the files a dataset needs (the message lists them and their origin)."""


@dataclass(eq=False)
class FewShotDataset:
    """One split of a few-shot classification dataset, decoded in memory.

    Invariants: ``labels`` are int64 in 0..n_classes-1 and every class has at least one
    example; ``class_names[c]`` names class ``c``; the classes of the train/val/test splits of
    one dataset are disjoint (checked by :func:`load_splits`).

    Attributes:
        images: [N, C, H, W] uint8 (decoded pixels; the sampler applies
            :func:`bilevel.data.normalize` with ``transform``) or float (used as is).
        labels: [N] int64 class ids.
        class_names: one name per class, e.g. ``"Greek/character01"`` or ``"n01532829"``.
        name: dataset name, e.g. ``"omniglot"``.
        split: ``"train"``, ``"val"`` or ``"test"`` (or a custom name).
        transform: resolved evaluation-transform spec (see :mod:`bilevel.data.transforms`);
            store it in model files so that PIL images map to the same tensors.
        metadata: free information (source files, alphabets, original label ids, ...).
    """

    images: Tensor
    labels: Tensor
    class_names: tuple[str, ...]
    name: str
    split: str
    transform: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.images, Tensor) or self.images.ndim != 4:
            shape = tuple(self.images.shape) if isinstance(self.images, Tensor) else type(self.images)
            raise ValueError(f"images must be a tensor [N, C, H, W], got {shape}")
        if not isinstance(self.labels, Tensor) or self.labels.dtype != torch.int64 or self.labels.ndim != 1:
            raise ValueError("labels must be an int64 tensor [N]")
        if self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(
                f"images has {self.images.shape[0]} examples but labels has {self.labels.shape[0]}"
            )
        self.class_names = tuple(str(c) for c in self.class_names)
        n_classes = len(self.class_names)
        if self.labels.numel() == 0 or n_classes == 0:
            raise ValueError(f"{self.name}/{self.split} is empty")
        if int(self.labels.min()) < 0 or int(self.labels.max()) >= n_classes:
            raise ValueError(
                f"labels must be in 0..{n_classes - 1} (one per class name), found "
                f"{int(self.labels.min())}..{int(self.labels.max())}"
            )
        counts = torch.bincount(self.labels, minlength=n_classes)
        if bool((counts == 0).any()):
            empty = [self.class_names[i] for i in torch.nonzero(counts == 0).flatten().tolist()[:5]]
            raise ValueError(f"classes without examples in {self.name}/{self.split}: {empty}")
        if len(set(self.class_names)) != n_classes:
            raise ValueError(f"class names of {self.name}/{self.split} are not unique")
        self.transform = resolve_transform_spec(self.transform)
        if self.transform["kind"] == "image":
            want = (self.transform["channels"], *self.transform["size"])
            if tuple(self.images.shape[1:]) != want:
                raise ValueError(
                    f"images have per-example shape {tuple(self.images.shape[1:])} but the "
                    f"transform spec {self.transform['name']!r} produces {want}"
                )

    @classmethod
    def from_tensors(
        cls,
        images: Tensor,
        labels: Tensor | Sequence[int],
        *,
        class_names: Sequence[str] | None = None,
        name: str = "custom",
        split: str = "train",
        transform: Mapping[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> FewShotDataset:
        """Build a split from your own tensors; arbitrary label ids are remapped to 0..C-1.

        Args:
            images: [N, C, H, W] uint8 or float.
            labels: [N] integer class ids (any values).
            class_names: names of the sorted unique label ids (default: the ids as strings).
            transform: spec; default ``{"name": "image", "size": [H, W], "channels": C}``.
        """
        lab = torch.as_tensor(labels)
        if lab.is_floating_point():
            raise TypeError(f"labels must be integers, got dtype {lab.dtype}")
        uniq, inv = torch.unique(lab, return_inverse=True)
        names = [str(int(u)) for u in uniq] if class_names is None else list(class_names)
        if len(names) != len(uniq):
            raise ValueError(f"{len(names)} class_names given for {len(uniq)} distinct labels")
        if transform is None:
            transform = {"name": "image", "size": list(images.shape[-2:]), "channels": images.shape[1]}
        return cls(images, inv.to(torch.int64), tuple(names), name, split, dict(transform),
                   dict(metadata or {}))

    def to(self, device: torch.device | str) -> FewShotDataset:
        """The same split with ``images``/``labels`` on ``device`` (e.g. a GPU-resident dataset:
        the sampler then gathers episodes there; episode content does not depend on the device)."""
        return dataclasses.replace(self, images=self.images.to(device), labels=self.labels.to(device))

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def class_counts(self) -> Tensor:
        """[n_classes] int64 number of examples per class."""
        return torch.bincount(self.labels.cpu(), minlength=self.n_classes)

    def __repr__(self) -> str:
        return (
            f"FewShotDataset(name={self.name!r}, split={self.split!r}, classes={self.n_classes}, "
            f"examples={len(self)}, images={tuple(self.images.shape)} {self.images.dtype})"
        )


# --------------------------------------------------------------------------- registry

Loader = Callable[..., dict[str, Any]]
_REGISTRY: dict[str, Loader] = {}
_NEEDS_ROOT: dict[str, bool] = {}


def _canonical(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    aliases = {"miniimagenet": "mini-imagenet", "tieredimagenet": "tiered-imagenet",
               "cifarfs": "cifar-fs", "cifar-fs": "cifar-fs", "fc-100": "fc100",
               "sine": "sinusoid"}
    return aliases.get(key, key)


def register_dataset(name: str, *, needs_root: bool = True) -> Callable[[Loader], Loader]:
    """Register ``loader(root, splits, **options) -> {split: dataset}`` under ``name``."""

    def deco(fn: Loader) -> Loader:
        _REGISTRY[_canonical(name)] = fn
        _NEEDS_ROOT[_canonical(name)] = needs_root
        return fn

    return deco


def available_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return sorted(_REGISTRY)


def _resolve_root(name: str, root: str | os.PathLike | None) -> Path | None:
    if root is None:
        env = os.environ.get("BILEVEL_DATA_ROOT")
        root = env if env else None
    if root is None:
        if _NEEDS_ROOT[name]:
            raise DatasetNotFoundError(
                f"dataset {name!r} is read from local files: pass root=... (CLI: --data-root) "
                "or set BILEVEL_DATA_ROOT; nothing is downloaded unless asked"
            )
        return None
    root = Path(root).expanduser()
    if _NEEDS_ROOT[name] and not root.is_dir():
        raise DatasetNotFoundError(f"data root {root} does not exist or is not a directory")
    return root


def load_splits(
    name: str,
    root: str | os.PathLike | None = None,
    splits: Iterable[str] = SPLITS,
    **options: Any,
) -> dict[str, Any]:
    """Load several splits of one dataset at once (files are decoded once for all of them).

    Invariant: the class names of the returned splits are pairwise disjoint.

    Args:
        name: one of :func:`available_datasets` (``omniglot``, ``mini-imagenet``,
            ``tiered-imagenet``, ``cifar-fs``, ``fc100``, ``sinusoid``, ``glyphs``).
        root: data root (``--data-root``); ``None`` uses ``$BILEVEL_DATA_ROOT``; the built-in
            ``glyphs`` and ``sinusoid`` need none.
        splits: which of ``train``/``val``/``test``.
        **options: dataset-specific options (see each loader's docstring).

    Returns:
        ``{split: FewShotDataset}`` (``SinusoidTasks`` for ``sinusoid``).
    """
    key = _canonical(name)
    if key not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; available: {available_datasets()}")
    splits = list(splits)
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise ValueError(f"splits must be a non-empty subset of {SPLITS}, got {splits}")
    out = _REGISTRY[key](_resolve_root(key, root), splits, **options)
    seen: dict[str, str] = {}
    for s in splits:
        ds = out[s]
        for c in getattr(ds, "class_names", ()):
            if c in seen:
                raise ValueError(
                    f"class {c!r} of {key} appears in both the {seen[c]!r} and {s!r} splits; "
                    "few-shot splits must have disjoint classes (check the data files)"
                )
            seen[c] = s
    return out


def load_dataset(
    name: str, root: str | os.PathLike | None = None, split: str = "train", **options: Any
) -> Any:
    """Load one split of a few-shot dataset into memory.

    Args:
        name: dataset name (see :func:`load_splits`).
        root: data root; see :func:`load_splits`.
        split: ``"train"``, ``"val"`` or ``"test"``.
        **options: dataset-specific options.

    Returns:
        A :class:`FewShotDataset` (``SinusoidTasks`` for ``sinusoid``).
    """
    return load_splits(name, root, [split], **options)[split]


# --------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """``$BILEVEL_CACHE_DIR``, else ``$XDG_CACHE_HOME/bilevel``, else ``~/.cache/bilevel``."""
    env = os.environ.get("BILEVEL_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "bilevel"


_CACHE_VERSION = 1


def cached(
    kind: str,
    key: Mapping[str, Any],
    build: Callable[[], dict[str, Any]],
    *,
    cache: bool,
    cache_dir: str | os.PathLike | None,
    images_shape: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Return ``build()``, memoised in ``<cache_dir>/<kind>-<hash(key)>.pt`` when ``cache``.

    The cache file is written atomically and read with ``weights_only=True``; an unreadable
    cache file, one whose ``images`` are not a uint8 tensor of ``images_shape`` (when given),
    or an unwritable cache dir only gives a warning naming the file (the data is rebuilt).
    """
    if not cache:
        return build()
    digest = hashlib.sha256(
        json.dumps({"v": _CACHE_VERSION, "kind": kind, **key}, sort_keys=True).encode()
    ).hexdigest()[:20]
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = path / f"{kind}-{digest}.pt"
    if path.is_file():
        try:
            value = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a broken cache is rebuilt, not fatal
            warnings.warn(f"ignoring unreadable cache file {path} ({str(e).splitlines()[0]}); rebuilding", stacklevel=3)
        else:
            images = value.get("images") if isinstance(value, dict) else None
            ok = images_shape is None or (isinstance(images, Tensor) and images.dtype == torch.uint8
                                          and tuple(images.shape) == tuple(images_shape))
            if ok:
                return value
            got = f"images {tuple(images.shape)} {images.dtype}" if isinstance(images, Tensor) else type(value).__name__
            warnings.warn(f"ignoring cache file {path}: it holds {got}, expected uint8 images "
                          f"{tuple(images_shape) if images_shape is not None else ''}; rebuilding", stacklevel=3)
    value = build()
    from bilevel._atomic import atomic_save

    try:
        atomic_save(value, path)
    except OSError as e:
        warnings.warn(
            f"could not write the decode cache {path} ({e}); pass cache_dir=... or cache=False",
            stacklevel=3,
        )
    return value


def file_key(paths: Iterable[Path]) -> list[list[Any]]:
    """Cache-key fragment identifying files by path, size and modification time."""
    out = []
    for p in paths:
        st = p.stat()
        out.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return out


# --------------------------------------------------------------------------- safe readers

_PICKLE_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
    ("builtins", "list"),
    ("builtins", "dict"),
    ("builtins", "set"),
    ("builtins", "tuple"),
    ("__builtin__", "list"),
    ("__builtin__", "dict"),
    ("_codecs", "encode"),
    ("copy_reg", "_reconstructor"),
    ("copyreg", "_reconstructor"),
    ("__builtin__", "object"),
    ("builtins", "object"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays and plain containers (no arbitrary code)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PICKLE_ALLOWED:
            if module == "__builtin__":
                module = "builtins"
            if module == "copy_reg":
                module = "copyreg"
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def read_pickle(path: Path) -> Any:
    """Read a dataset pickle (Python 3, or Python 2 via latin1) with a restricted unpickler.

    Only numpy arrays and builtin containers can be rebuilt. Any failure is a ``ValueError``
    naming the file.
    """
    data = path.read_bytes()
    last: Exception | None = None
    for encoding in ("ASCII", "latin1"):
        try:
            return _ArrayUnpickler(io.BytesIO(data), encoding=encoding).load()
        except UnicodeDecodeError as e:  # Python 2 str -> retry as latin1 (MetaOptNet does)
            last = e
            continue
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            raise ValueError(f"corrupt or unreadable pickle {path}: {type(e).__name__}: {e}") from e
    raise ValueError(f"corrupt or unreadable pickle {path}: {last}")


def decode_image(data: bytes | Path, spec: Mapping[str, Any], where: str) -> Tensor:
    """Decode one image file (bytes or path) to uint8 [C, H, W]; ``ValueError`` naming it."""
    from PIL import Image, UnidentifiedImageError

    from bilevel.data.transforms import pil_to_uint8

    try:
        if isinstance(data, Path):
            with Image.open(data) as im:
                im.load()
                return pil_to_uint8(im, spec)
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return pil_to_uint8(im, spec)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"corrupt or unreadable image {where}: {e}") from e


def remap_labels(labels: Sequence[int] | np.ndarray, names: Mapping[int, str] | None = None
                 ) -> tuple[Tensor, tuple[str, ...], list[int]]:
    """Map arbitrary integer class ids to 0..C-1 (sorted), with a name per class."""
    lab = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    uniq, inv = torch.unique(lab, return_inverse=True)
    ids = [int(u) for u in uniq]
    class_names = tuple(names[i] if names and i in names else str(i) for i in ids)
    return inv.to(torch.int64), class_names, ids


def hwc_to_tensor(arr: np.ndarray, where: str) -> Tensor:
    """uint8 images [N, H, W, C] (or [N, H, W]) -> contiguous tensor [N, C, H, W]."""
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{where}: expected a numpy array of images, got {type(arr).__name__}")
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"{where}: expected uint8 images [N, H, W, 3], got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"{where}: expected dtype uint8 images, got {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous()


def resize_images(images: Tensor, spec: Mapping[str, Any]) -> Tensor:
    """Resize uint8 [N, C, H, W] to ``spec["size"]`` with the same PIL path as the transform."""
    h, w = spec["size"]
    if tuple(images.shape[-2:]) == (h, w):
        return images
    from PIL import Image

    from bilevel.data.transforms import pil_to_uint8

    sub = dict(spec, invert=False)
    out = torch.empty((images.shape[0], images.shape[1], h, w), dtype=torch.uint8)
    for i in range(images.shape[0]):
        arr = images[i].permute(1, 2, 0).numpy()
        out[i] = pil_to_uint8(Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr), sub)
    return out
