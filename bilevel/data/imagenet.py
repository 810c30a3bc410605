"""miniImageNet, tieredImageNet, CIFAR-FS and FC100 in the file formats the MetaOptNet code reads.

Formats (Lee et al. 2019, https://github.com/kjunelee/MetaOptNet, whose loaders follow Gidaris &
Komodakis 2018); ``data`` holds uint8 images [N, H, W, 3], ``labels`` a list of N class ids::

    miniImageNet   miniImageNet_category_split_train_phase_train.pickle   {"data", "labels"[, "catname2label"]}
                   miniImageNet_category_split_val.pickle
                   miniImageNet_category_split_test.pickle
      or (Ravi & Larochelle split) train.csv / val.csv / test.csv ("filename,label") + images/*.jpg
    tieredImageNet {train,val,test}_images.npz ("images") + {train,val,test}_labels.pkl
                   ("labels" or "label_specific"[, "label_specific_str"])
    CIFAR-FS       CIFAR_FS_{train,val,test}.pickle
    FC100          FC100_{train,val,test}.pickle

The root itself and the usual sub-folders (``miniImageNet``, ``mini-imagenet``, ...) are searched.
Pickles are read with a restricted unpickler (numpy arrays and plain containers only), Python 2
pickles via ``latin1`` as in MetaOptNet. Class ids are remapped to 0..C-1 per split; the original
ids are kept in ``metadata["original_labels"]``.
"""
from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bilevel.data.base import (
    DatasetNotFoundError,
    FewShotDataset,
    cached,
    decode_image,
    file_key,
    hwc_to_tensor,
    read_pickle,
    register_dataset,
    remap_labels,
    resize_images,
)
from bilevel.data.transforms import resolve_transform_spec

__all__ = ["load_cifar_fs", "load_fc100", "load_mini_imagenet", "load_tiered_imagenet"]

_MINI_PICKLES = {
    "train": "miniImageNet_category_split_train_phase_train.pickle",
    "val": "miniImageNet_category_split_val.pickle",
    "test": "miniImageNet_category_split_test.pickle",
}
_ORIGIN = {
    "mini-imagenet": "the MetaOptNet README (pickles of Gidaris & Komodakis, "
                     "https://github.com/gidariss/FewShotWithoutForgetting) or the Ravi & "
                     "Larochelle split CSVs (https://github.com/twitter/meta-learning-lstm) with "
                     "ILSVRC-2012 JPEGs in images/",
    "tiered-imagenet": "the MetaOptNet README (tieredImageNet of Ren et al. 2018 as .npz + .pkl)",
    "cifar-fs": "the MetaOptNet README (CIFAR-FS of Bertinetto et al. 2019)",
    "fc100": "the MetaOptNet README (FC100 of Oreshkin et al. 2018)",
}
_SUBDIRS = {
    "mini-imagenet": ("miniImageNet", "mini-imagenet", "miniimagenet", "mini_imagenet"),
    "tiered-imagenet": ("tieredImageNet", "tiered-imagenet", "tieredimagenet", "tiered_imagenet"),
    "cifar-fs": ("CIFAR_FS", "CIFAR-FS", "cifar-fs", "cifar_fs", "cifarfs"),
    "fc100": ("FC100", "fc100", "FC-100"),
}


def _search(root: Path, name: str, files: Sequence[str]) -> Path | None:
    """The first of root, root/<alias> that holds every file in ``files``."""
    for base in (root, *(root / d for d in _SUBDIRS[name])):
        if all((base / f).exists() for f in files):
            return base
    return None


def _missing(root: Path, name: str, expected: Sequence[str]) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"{name}: missing files under {root} (also searched {', '.join(_SUBDIRS[name])}/): "
        f"expected {', '.join(expected)}; these come from {_ORIGIN[name]}. "
        "Nothing is downloaded automatically."
    )


def _pickle_split(path: Path, name: str, split: str, spec: dict[str, Any]) -> FewShotDataset:
    obj = read_pickle(path)
    if not isinstance(obj, Mapping) or "data" not in obj or "labels" not in obj:
        keys = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(f"{path}: expected a dict with keys 'data' and 'labels', got {keys}")
    images = hwc_to_tensor(obj["data"], str(path))
    labels = np.asarray(obj["labels"]).reshape(-1)
    if labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{path}: 'data' has {images.shape[0]} images but 'labels' has {labels.shape[0]}"
        )
    names = None
    if isinstance(obj.get("catname2label"), Mapping):
        names = {int(v): (k.decode() if isinstance(k, bytes) else str(k))
                 for k, v in obj["catname2label"].items()}
    lab, class_names, ids = remap_labels(labels, names)
    return FewShotDataset(
        images=resize_images(images, spec),
        labels=lab,
        class_names=class_names,
        name=name,
        split=split,
        transform=spec,
        metadata={"source": str(path), "original_labels": ids},
    )


def _load_pickles(root: Path, splits: Sequence[str], name: str, files: Mapping[str, str],
                  spec: dict[str, Any]) -> dict[str, FewShotDataset]:
    wanted = [files[s] for s in splits]
    base = _search(root, name, wanted)
    if base is None:
        raise _missing(root, name, wanted)
    return {s: _pickle_split(base / files[s], name, s, spec) for s in splits}


def _csv_split(base: Path, split: str, spec: dict[str, Any], cache: bool,
               cache_dir: str | os.PathLike | None) -> FewShotDataset:
    path = base / f"{split}.csv"
    rows: list[tuple[str, str]] = []
    with open(path, newline="") as f:
        reader = csv.reader(f)
        for i, row in enumerate(reader):
            if not row:
                continue
            if i == 0 and [c.strip().lower() for c in row[:2]] == ["filename", "label"]:
                continue
            if len(row) < 2:
                raise ValueError(f"{path}, line {i + 1}: expected 'filename,label', got {row}")
            rows.append((row[0].strip(), row[1].strip()))
    if not rows:
        raise ValueError(f"{path} lists no images")
    files = [base / "images" / fn for fn, _ in rows]
    absent = [str(p) for p in files if not p.is_file()]
    if absent:
        raise DatasetNotFoundError(
            f"mini-imagenet: {len(absent)} image(s) listed in {path} are missing, e.g. {absent[0]}; "
            f"expected JPEGs in {base / 'images'} ({_ORIGIN['mini-imagenet']})"
        )

    def build() -> dict[str, Any]:
        h, w = spec["size"]
        out = torch.empty((len(files), 3, h, w), dtype=torch.uint8)
        for i, p in enumerate(files):
            out[i] = decode_image(p, spec, str(p))
        return {"images": out}

    key = {"csv": file_key([path]), "spec": spec, "files": len(files)}
    images = cached("mini-imagenet-csv", key, build, cache=cache, cache_dir=cache_dir,
                    images_shape=(len(files), 3, *spec["size"]))["images"]
    class_names = sorted({lab for _, lab in rows})
    cid = {c: i for i, c in enumerate(class_names)}
    labels = torch.tensor([cid[lab] for _, lab in rows], dtype=torch.int64)
    return FewShotDataset(images, labels, tuple(class_names), "mini-imagenet", split, spec,
                          {"source": str(path)})


@register_dataset("mini-imagenet")
def load_mini_imagenet(
    root: Path,
    splits: Sequence[str],
    *,
    format: str = "auto",
    size: int = 84,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, FewShotDataset]:
    """miniImageNet (Vinyals et al. 2016, Ravi & Larochelle split: 64/16/20 classes, 600 each).

    Args:
        root: data root holding the MetaOptNet pickles or ``{split}.csv`` + ``images/``.
        splits: splits to return.
        format: ``"pickle"``, ``"csv"`` or ``"auto"`` (pickles if present, else CSV).
        size: image side; stored pickles are 84x84, other sizes are resized (LANCZOS).
        cache, cache_dir: memoise decoded JPEGs of the CSV layout (see Omniglot).

    Returns:
        ``{split: FewShotDataset}`` of uint8 [N, 3, size, size].
    """
    spec = resolve_transform_spec({"name": "mini-imagenet", "size": int(size)})
    if format not in ("auto", "pickle", "csv"):
        raise ValueError(f"format must be 'auto', 'pickle' or 'csv', got {format!r}")
    want_p = [_MINI_PICKLES[s] for s in splits]
    want_c = [f"{s}.csv" for s in splits] + ["images"]
    if format in ("auto", "pickle") and _search(root, "mini-imagenet", want_p) is not None:
        return _load_pickles(root, splits, "mini-imagenet", _MINI_PICKLES, spec)
    if format in ("auto", "csv"):
        base = _search(root, "mini-imagenet", want_c)
        if base is not None:
            return {s: _csv_split(base, s, spec, cache, cache_dir) for s in splits}
    if format == "pickle":
        expected = want_p
    elif format == "csv":
        expected = want_c
    else:
        expected = [*want_p, "or (Ravi split) " + " + ".join(want_c)]
    raise _missing(root, "mini-imagenet", expected)


@register_dataset("tiered-imagenet")
def load_tiered_imagenet(
    root: Path, splits: Sequence[str], *, size: int = 84
) -> dict[str, FewShotDataset]:
    """tieredImageNet (Ren et al. 2018: 351/97/160 classes) from ``*_images.npz`` + ``*_labels.pkl``.

    Args:
        root: data root.
        splits: splits to return.
        size: image side (stored 84x84; other sizes are resized).

    Returns:
        ``{split: FewShotDataset}`` of uint8 [N, 3, size, size].
    """
    spec = resolve_transform_spec({"name": "tiered-imagenet", "size": int(size)})
    wanted = [f for s in splits for f in (f"{s}_images.npz", f"{s}_labels.pkl")]
    base = _search(root, "tiered-imagenet", wanted)
    if base is None:
        raise _missing(root, "tiered-imagenet", wanted)
    out = {}
    for s in splits:
        ipath, lpath = base / f"{s}_images.npz", base / f"{s}_labels.pkl"
        try:
            with np.load(ipath, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files if k == "images"} if hasattr(z, "files") else None
                found = list(z.files) if hasattr(z, "files") else type(z).__name__
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            raise ValueError(f"corrupt or unreadable npz {ipath}: {type(e).__name__}: {e}") from e
        if not arrays:
            raise ValueError(f"{ipath}: expected an .npz holding the array 'images', found {found}")
        arr = arrays["images"]
        meta = read_pickle(lpath)
        key = "labels" if isinstance(meta, Mapping) and "labels" in meta else "label_specific"
        if not isinstance(meta, Mapping) or key not in meta:
            keys = sorted(meta) if isinstance(meta, Mapping) else type(meta).__name__
            raise ValueError(f"{lpath}: expected a dict with 'labels' or 'label_specific', got {keys}")
        images = hwc_to_tensor(arr, str(ipath))
        labels = np.asarray(meta[key]).reshape(-1)
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"{ipath} has {images.shape[0]} images but {lpath} has {labels.shape[0]} labels")
        names = None
        strs = meta.get("label_specific_str")
        if key == "label_specific" and strs is not None and len(strs) > int(labels.max()):
            names = {i: (v.decode() if isinstance(v, bytes) else str(v)) for i, v in enumerate(strs)}
        lab, class_names, ids = remap_labels(labels, names)
        out[s] = FewShotDataset(resize_images(images, spec), lab, class_names, "tiered-imagenet",
                                s, spec, {"source": str(ipath), "original_labels": ids})
    return out


def _cifar(name: str, prefix: str, root: Path, splits: Sequence[str], size: int
           ) -> dict[str, FewShotDataset]:
    spec = resolve_transform_spec({"name": name, "size": int(size)})
    files = {s: f"{prefix}_{s}.pickle" for s in ("train", "val", "test")}
    return _load_pickles(root, splits, name, files, spec)


@register_dataset("cifar-fs")
def load_cifar_fs(root: Path, splits: Sequence[str], *, size: int = 32) -> dict[str, FewShotDataset]:
    """CIFAR-FS (Bertinetto et al. 2019: 64/16/20 CIFAR-100 classes) from ``CIFAR_FS_{split}.pickle``."""
    return _cifar("cifar-fs", "CIFAR_FS", root, splits, size)


@register_dataset("fc100")
def load_fc100(root: Path, splits: Sequence[str], *, size: int = 32) -> dict[str, FewShotDataset]:
    """FC100 (Oreshkin et al. 2018: 60/20/20 classes by superclass) from ``FC100_{split}.pickle``."""
    return _cifar("fc100", "FC100", root, splits, size)
