"""Omniglot (Lake et al. 2015) from local files: official layout and the reduced background sets.

Accepted layouts under the data root (each set as an extracted folder or as a ``.zip``; the
root itself, ``<root>/omniglot`` and ``<root>/omniglot-py`` -- torchvision's folder -- are
searched)::

    images_background/<Alphabet>/<characterNN>/<id>_<drawer>.png          (30 alphabets, 964 chars)
    images_evaluation/<Alphabet>/<characterNN>/*.png                       (20 alphabets, 659 chars)
    images_background_small1/...  images_background_small2/...             (reduced sets)

Files come from https://github.com/brendenlake/omniglot (``python/*.zip``).

Merging: characters are identified by (alphabet, character folder) and drawings by file name,
so a set that repeats another's characters adds nothing twice. The two small sets both contain
Greek and Latin (identical files): together they give 5 + 5 - 2 = 8 alphabets and
136 + 156 - 50 = 242 characters (4840 drawings).
"""
from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bilevel.data.base import (
    DatasetNotFoundError,
    FewShotDataset,
    cached,
    decode_image,
    file_key,
    register_dataset,
)
from bilevel.data.transforms import resolve_transform_spec

__all__ = ["OMNIGLOT_SETS", "load_omniglot"]

OMNIGLOT_SETS = (
    "images_background",
    "images_evaluation",
    "images_background_small1",
    "images_background_small2",
)
_FULL = OMNIGLOT_SETS[:2]
_SMALL = OMNIGLOT_SETS[2:]
# Character split of Vinyals et al. 2016 (1028 / 172 / 423 of 1623), as fractions.
DEFAULT_FRACTIONS = (1028 / 1623, 172 / 1623, 423 / 1623)

_EXPECTED = (
    "Omniglot expects under the data root (or <root>/omniglot, <root>/omniglot-py) the sets "
    "images_background + images_evaluation (official) and/or images_background_small1 / "
    "images_background_small2 (reduced), each as a folder or .zip "
    "(from https://github.com/brendenlake/omniglot/tree/master/python); from Python, "
    "bilevel.data.load_dataset('omniglot', root, download=True) fetches the official sets with torchvision"
)


def _find_sets(root: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for base in (root, root / "omniglot", root / "omniglot-py"):
        for s in OMNIGLOT_SETS:
            if s in found:
                continue
            if (base / s).is_dir():
                found[s] = base / s
            elif (base / f"{s}.zip").is_file():
                found[s] = base / f"{s}.zip"
    return found


def _list_set(src: Path) -> list[tuple[str, str, str, Any]]:
    """(alphabet, character, file name, handle) for every PNG of one set (dir or zip)."""
    items = []
    if src.is_dir():
        for alpha in sorted(os.listdir(src)):
            adir = src / alpha
            if not adir.is_dir():
                continue
            for char in sorted(os.listdir(adir)):
                cdir = adir / char
                if not cdir.is_dir():
                    continue
                for f in sorted(os.listdir(cdir)):
                    if f.lower().endswith(".png"):
                        items.append((alpha, char, f, cdir / f))
        return items
    try:
        zf = zipfile.ZipFile(src)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"corrupt or unreadable zip {src}: {e}") from e
    with zf:
        for info in zf.infolist():
            parts = info.filename.strip("/").split("/")
            # <set>/<alphabet>/<character>/<file>.png (the top folder may be missing)
            if info.is_dir() or not parts[-1].lower().endswith(".png") or len(parts) < 3:
                continue
            items.append((parts[-3], parts[-2], parts[-1], (src, info.filename)))
    return items


def _decode_all(entries: list[tuple[str, str, str, Any]], spec: dict[str, Any]) -> torch.Tensor:
    h, w = spec["size"]
    out = torch.empty((len(entries), 1, h, w), dtype=torch.uint8)
    zips: dict[Path, zipfile.ZipFile] = {}
    try:
        for i, (_, _, _, handle) in enumerate(entries):
            if isinstance(handle, Path):
                out[i] = decode_image(handle, spec, str(handle))
            else:
                zpath, member = handle
                zf = zips.get(zpath)
                if zf is None:
                    zf = zips[zpath] = zipfile.ZipFile(zpath)
                try:
                    data = zf.read(member)
                except (zipfile.BadZipFile, OSError) as e:
                    raise ValueError(f"corrupt or unreadable image {zpath}:{member}: {e}") from e
                out[i] = decode_image(data, spec, f"{zpath}:{member}")
    finally:
        for zf in zips.values():
            zf.close()
    return out


def _assign(units: list[str], fractions: Sequence[float], seed: int, what: str
            ) -> dict[str, str]:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"split_fractions must be 3 non-negative numbers, got {fractions}")
    tot = float(sum(fractions))
    n = len(units)
    n_train = round(fractions[0] / tot * n)
    n_val = round(fractions[1] / tot * n)
    n_test = n - n_train - n_val
    if min(n_train, n_val, n_test) < 1:
        raise ValueError(
            f"splitting {n} {what} by fractions {tuple(fractions)} gives train/val/test = "
            f"{n_train}/{n_val}/{n_test}; every split needs at least one {what[:-1]} "
            "(use split_by='character' or change split_fractions)"
        )
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g).tolist()
    ordered = [units[i] for i in perm]
    out = {}
    for i, u in enumerate(ordered):
        out[u] = "train" if i < n_train else ("val" if i < n_train + n_val else "test")
    return out


def parse_holdout(text: str) -> tuple[int, int]:
    """``"k/n"`` -> ``(k, n)`` with ``0 <= k < n`` and ``n >= 2``; ValueError naming the text otherwise."""
    try:
        k, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise ValueError(f"holdout must be 'k/n' (fold k of n, 0-based, e.g. 0/4), got {text!r}") from None
    if not (n >= 2 and 0 <= k < n):
        raise ValueError(f"holdout {text!r}: need n >= 2 folds and 0 <= k < n")
    return k, n


def _holdout_splits(chars: list[str], alphabet_of_char: list[str], fold: tuple[int, int], val: float,
                    seed: int) -> list[str]:
    """The split of every character under ``holdout=k/n`` (see :func:`load_omniglot`)."""
    k, n = fold
    alphabets = sorted(set(alphabet_of_char))
    if len(alphabets) < n:
        raise ValueError(f"holdout {k}/{n}: only {len(alphabets)} alphabets to deal into {n} folds")
    perm = torch.randperm(len(alphabets), generator=torch.Generator().manual_seed(seed)).tolist()
    test = {alphabets[j] for pos, j in enumerate(perm) if pos % n == k}
    out = ["test" if a in test else "train" for a in alphabet_of_char]
    g = torch.Generator().manual_seed(seed + 1)
    for a in alphabets:
        if a in test:
            continue
        members = [i for i, b in enumerate(alphabet_of_char) if b == a]  # chars are sorted: deterministic
        n_val = max(1, round(val * len(members)))
        if n_val >= len(members):
            raise ValueError(f"holdout {k}/{n}: alphabet {a!r} has {len(members)} characters; holdout_val={val} "
                             "leaves none to train on")
        for j in torch.randperm(len(members), generator=g)[:n_val].tolist():
            out[members[j]] = "val"
    return out


@register_dataset("omniglot")
def load_omniglot(
    root: Path,
    splits: Sequence[str],
    *,
    sets: str | Sequence[str] = "auto",
    size: int = 28,
    split_by: str = "character",
    split_fractions: Sequence[float] = DEFAULT_FRACTIONS,
    split_seed: int = 0,
    rotations: bool = False,
    holdout: str | None = None,
    holdout_val: float = 0.2,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
) -> dict[str, FewShotDataset]:
    """Omniglot splits as uint8 tensors [N, 1, size, size] (strokes 255 on 0, MAML convention).

    Invariants: a character (and, with ``rotations``, all its rotated copies) belongs to exactly
    one split; the split depends only on the character/alphabet names, ``split_fractions`` and
    ``split_seed`` (sorted names, then a seeded permutation), never on file order.

    Args:
        root: data root (see the module docstring for the layouts).
        splits: splits to return.
        sets: ``"auto"`` (the official sets if any is present, else the small sets present) or
            an explicit list of set names from ``OMNIGLOT_SETS``.
        size: images are resized (LANCZOS) to ``size`` x ``size``; 28 as in MAML/ProtoNets.
        split_by: ``"character"`` (Vinyals-style: characters of all alphabets shuffled) or
            ``"alphabet"`` (whole alphabets per split).
        split_fractions: train/val/test fractions of the units (default 1028:172:423).
        split_seed: seed of the deterministic assignment.
        rotations: add the 90, 180, 270 degree rotations of every character as new classes in
            the same split (MAML, ProtoNets); classes are ordered ``char*4 + k``.
        holdout: ``"k/n"`` -- the cross-validation protocol of transfer to unseen alphabets
            (needs ``split_by="alphabet"``; replaces ``split_fractions``): the alphabets, in a
            seeded permutation of their sorted names (``split_seed``), are dealt into ``n``
            folds; fold ``k``'s alphabets (0-based) are the test split, every other alphabet
            trains. Validation holds ``holdout_val`` of each training alphabet's characters
            (seeded; at least one): it selects the best state on the training alphabets and
            never sees a test alphabet.
        holdout_val: fraction of each training alphabet's characters held out for validation.
        cache: memoise the decoded tensors in ``cache_dir`` (default
            :func:`bilevel.data.default_cache_dir`) so that later loads skip PNG decoding.
        download: explicitly fetch ``images_background``/``images_evaluation`` with torchvision
            into ``<root>/omniglot-py`` when they are missing (never done by default).

    Returns:
        ``{split: FewShotDataset}`` with class names ``"Alphabet/characterNN"`` (``"/rot90"``
        etc. appended for rotations) and metadata ``alphabets`` (the split's, sorted),
        ``class_alphabets`` (the alphabet of every class, in class order: what
        ``EpisodeSampler(within_alphabet=True)`` groups by), ``sets``, ``rotations``.
    """
    if split_by not in ("character", "alphabet"):
        raise ValueError(f"split_by must be 'character' or 'alphabet', got {split_by!r}")
    fold = parse_holdout(holdout) if holdout is not None else None
    if fold is not None and split_by != "alphabet":
        raise ValueError(f"holdout={holdout!r} holds out whole alphabets: it needs split_by='alphabet'")
    if fold is not None and not 0 < holdout_val < 1:
        raise ValueError(f"holdout_val must be in (0, 1), got {holdout_val}")
    found = _find_sets(root)
    if download and not all(s in found for s in _FULL):
        from torchvision.datasets import Omniglot

        for background in (True, False):
            Omniglot(str(root), background=background, download=True)
        found = _find_sets(root)
    if sets == "auto":
        use = [s for s in _FULL if s in found] or [s for s in _SMALL if s in found]
        if not use:
            listing = sorted(p.name for p in root.iterdir())[:20]
            raise DatasetNotFoundError(f"no Omniglot set found in {root} (contains {listing}). {_EXPECTED}")
    else:
        use = [sets] if isinstance(sets, str) else list(sets)
        unknown = [s for s in use if s not in OMNIGLOT_SETS]
        if unknown:
            raise ValueError(f"unknown Omniglot sets {unknown}; choose from {OMNIGLOT_SETS}")
        missing = [s for s in use if s not in found]
        if missing:
            raise DatasetNotFoundError(f"Omniglot sets {missing} not found in {root}. {_EXPECTED}")
    spec = resolve_transform_spec({"name": "omniglot", "size": int(size)})

    # Merge sets by (alphabet, character, file): repeated characters count once.
    merged: dict[tuple[str, str, str], Any] = {}
    for s in use:
        for alpha, char, fname, handle in _list_set(found[s]):
            merged.setdefault((alpha, char, fname), handle)
    if not merged:
        raise DatasetNotFoundError(f"Omniglot sets {use} in {root} contain no PNG files. {_EXPECTED}")
    keys = sorted(merged)
    entries = [(a, c, f, merged[(a, c, f)]) for a, c, f in keys]

    def build() -> dict[str, Any]:
        return {"images": _decode_all(entries, spec)}

    # zips are identified by their own stat, extracted folders by the stat of every file
    zips = [found[s] for s in use if found[s].is_file()]
    loose = [h for *_, h in entries if isinstance(h, Path)]
    key = {"sources": file_key(zips) + file_key(loose), "files": len(entries), "spec": spec}
    images = cached("omniglot", key, build, cache=cache, cache_dir=cache_dir,
                    images_shape=(len(entries), 1, *spec["size"]))["images"]

    char_names = [f"{a}/{c}" for a, c, _ in keys]
    chars = sorted(set(char_names))
    char_id = {c: i for i, c in enumerate(chars)}
    char_of = torch.tensor([char_id[c] for c in char_names], dtype=torch.int64)
    alphabet_of_char = [c.split("/")[0] for c in chars]
    if split_by == "character":
        where = _assign(chars, split_fractions, split_seed, "characters")
        split_of_char = [where[c] for c in chars]
    elif fold is None:
        where = _assign(sorted(set(alphabet_of_char)), split_fractions, split_seed, "alphabets")
        split_of_char = [where[a] for a in alphabet_of_char]
    else:
        split_of_char = _holdout_splits(chars, alphabet_of_char, fold, holdout_val, split_seed)

    out: dict[str, FewShotDataset] = {}
    for s in splits:
        members = [i for i, sp in enumerate(split_of_char) if sp == s]
        local = torch.full((len(chars),), -1, dtype=torch.int64)
        local[members] = torch.arange(len(members))
        mask = local[char_of] >= 0
        imgs = images[mask]
        labels = local[char_of[mask]]
        names = [chars[i] for i in members]
        if rotations:
            imgs = torch.cat([torch.rot90(imgs, k, dims=(-2, -1)) for k in range(4)])
            labels = torch.cat([labels * 4 + k for k in range(4)])
            names = [f"{n}/rot{90 * k}" if k else n for n in names for k in range(4)]
            order = torch.argsort(labels, stable=True)
            imgs, labels = imgs[order], labels[order]
        out[s] = FewShotDataset(
            images=imgs.contiguous(),
            labels=labels,
            class_names=tuple(names),
            name="omniglot",
            split=s,
            transform=spec,
            metadata={
                "sets": use,
                "alphabets": sorted({alphabet_of_char[i] for i in members}),
                "class_alphabets": tuple(name.split("/")[0] for name in names),
                "characters": len(members),
                "rotations": rotations,
                "split_by": split_by,
                "split_seed": split_seed,
                **({"holdout": f"{fold[0]}/{fold[1]}", "holdout_val": holdout_val} if fold else {}),
            },
        )
    return out
