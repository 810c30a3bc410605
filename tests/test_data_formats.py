"""miniImageNet / tieredImageNet / CIFAR-FS / FC100 loaders on tiny fixtures in the real formats.

Fixtures are written here in exactly the layouts the MetaOptNet code reads (pickles with
``data``/``labels``, tieredImageNet ``*_images.npz`` + ``*_labels.pkl``) and the Ravi-split
CSV + JPEG layout; nothing is downloaded.
"""
from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

import bilevel.data.base as base
from bilevel.data import (
    DatasetNotFoundError,
    EpisodeSampler,
    available_datasets,
    build_transform,
    load_dataset,
    load_splits,
    normalize,
)

MINI = {
    "train": "miniImageNet_category_split_train_phase_train.pickle",
    "val": "miniImageNet_category_split_val.pickle",
    "test": "miniImageNet_category_split_test.pickle",
}
# classes per split: global ids as in the real pickles (train 0..63, val 64..79, test 80..99)
IDS = {"train": [0, 1, 2, 3], "val": [64, 65, 66], "test": [80, 81, 82]}


def _images(rng: np.random.Generator, n: int, side: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, side, side, 3), dtype=np.uint8)


def _data_pickle(path, rng, ids, per, side, names=None, protocol=4):
    labels = [i for i in ids for _ in range(per)]
    obj = {"data": _images(rng, len(labels), side), "labels": labels}
    if names is not None:
        obj["catname2label"] = {names[i]: i for i in ids}
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return obj


def _py2_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """Protocol-2 pickle exactly as Python 2 writes {'data': uint8 array, 'labels': [...]}:
    str objects are byte strings, which Python 3 only reads with encoding='latin1'."""

    def sbs(s: bytes) -> bytes:
        return b"U" + bytes([len(s)]) + s

    def i1(v: int) -> bytes:
        return b"K" + bytes([v])

    def i4(v: int) -> bytes:
        return b"J" + struct.pack("<i", v)

    raw = data.tobytes()
    out = b"\x80\x02}(" + sbs(b"data")
    out += b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + i1(0) + b"\x85" + sbs(b"b")
    out += b"\x87R(" + i1(1) + b"(" + b"".join(i4(d) for d in data.shape) + b"t"
    out += b"cnumpy\ndtype\n" + sbs(b"u1") + i1(0) + i1(1) + b"\x87R"
    out += b"(" + i1(3) + sbs(b"|") + b"NNN" + i4(-1) + i4(-1) + i1(0) + b"tb"
    out += b"\x89T" + struct.pack("<i", len(raw)) + raw + b"tb"
    out += sbs(b"labels") + b"](" + b"".join(i4(v) for v in labels) + b"eu."
    return out


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_registry_lists_all_datasets():
    assert set(available_datasets()) >= {"omniglot", "mini-imagenet", "tiered-imagenet",
                                         "cifar-fs", "fc100", "sinusoid", "glyphs"}
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet", "/tmp")


def test_mini_imagenet_pickles(tmp_path, rng):
    d = tmp_path / "miniImageNet"  # conventional sub-folder is searched
    d.mkdir()
    names = {i: f"n{i:08d}" for ids in IDS.values() for i in ids}
    raw = {s: _data_pickle(d / MINI[s], rng, IDS[s], 6, 84, names) for s in MINI}
    sp = load_splits("miniImageNet", tmp_path)
    tr = sp["train"]
    assert tr.images.shape == (24, 3, 84, 84) and tr.images.dtype == torch.uint8
    assert tr.class_names == ("n00000000", "n00000001", "n00000002", "n00000003")
    assert sp["val"].labels.tolist() == [i for i in range(3) for _ in range(6)]
    assert sp["val"].metadata["original_labels"] == [64, 65, 66]
    assert torch.equal(tr.images[7], torch.from_numpy(raw["train"]["data"][7]).permute(2, 0, 1))
    assert tr.transform["name"] == "mini-imagenet" and tr.transform["size"] == [84, 84]
    # a PIL image of a stored example maps to exactly the sampler's tensor
    s = EpisodeSampler(sp["test"], ways=3, shots=2, queries=4)
    ep, plan = s.sample(0), s.plan(0)
    k = int(plan.support[0, 0])
    pil = Image.fromarray(raw["test"]["data"][k])
    assert torch.equal(build_transform(sp["test"].transform)(pil), ep.support_x[0, 0])
    small = load_dataset("mini-imagenet", tmp_path, "val", size=42)
    assert small.images.shape == (18, 3, 42, 42) and small.transform["size"] == [42, 42]


def test_mini_imagenet_python2_pickle(tmp_path, rng):
    for s in MINI:
        labels = [i for i in IDS[s] for _ in range(3)]
        data = _images(rng, len(labels), 84)
        data[0, 0, 0, 0] = 200  # a non-ASCII byte: ASCII decoding of the py2 str must fail
        (tmp_path / MINI[s]).write_bytes(_py2_pickle(data, labels))
    with pytest.raises(UnicodeDecodeError):
        pickle.loads((tmp_path / MINI["val"]).read_bytes())
    ds = load_dataset("mini-imagenet", tmp_path, "val")
    assert ds.images.shape == (9, 3, 84, 84) and int(ds.images[0, 0, 0, 0]) == 200
    assert ds.class_names == ("64", "65", "66")


def _write_csv_layout(root, rng, sizes=(100, 90)):
    (root / "images").mkdir(parents=True)
    files = {}
    for s, ids in IDS.items():
        lines = ["filename,label"]
        for c in ids:
            for j in range(4):
                fn = f"n{c:08d}{j:08d}.jpg"
                Image.fromarray(rng.integers(0, 256, size=(*sizes, 3), dtype=np.uint8)).save(
                    root / "images" / fn, quality=90)
                lines.append(f"{fn},n{c:08d}")
                files.setdefault(s, []).append(fn)
        (root / f"{s}.csv").write_text("\n".join(lines) + "\n")
    return files


def test_mini_imagenet_csv_jpeg_and_cache(tmp_path, rng, monkeypatch):
    root = tmp_path / "mini-imagenet"
    files = _write_csv_layout(root, rng)
    cache = tmp_path / "cache"
    ds = load_dataset("mini-imagenet", tmp_path, "train", format="csv", cache_dir=cache)
    assert ds.images.shape == (16, 3, 84, 84)
    assert ds.class_names == tuple(f"n{c:08d}" for c in IDS["train"])
    # CSV rows keep their order; the transform of the JPEG equals the stored example
    with Image.open(root / "images" / files["train"][5]) as im:
        want = build_transform(ds.transform)(im)
    assert torch.equal(want, normalize(ds.images[5], ds.transform))
    assert len(list(cache.glob("mini-imagenet-csv-*.pt"))) == 1
    assert not list(cache.glob(".*tmp"))  # atomic write left no temporary file

    def boom(*a, **k):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr("bilevel.data.imagenet.decode_image", boom)
    again = load_dataset("mini-imagenet", tmp_path, "train", format="csv", cache_dir=cache)
    assert torch.equal(again.images, ds.images)


def test_mini_imagenet_csv_errors(tmp_path, rng):
    root = tmp_path / "m"
    files = _write_csv_layout(root, rng)
    (root / "images" / files["val"][2]).write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ValueError, match=rf"corrupt or unreadable image .*{files['val'][2]}"):
        load_dataset("mini-imagenet", root, "val", cache=False)
    (root / "images" / files["test"][1]).unlink()
    with pytest.raises(DatasetNotFoundError, match=rf"1 image\(s\) listed in .*test.csv are missing.*{files['test'][1]}"):
        load_dataset("mini-imagenet", root, "test", cache=False)


def test_tiered_imagenet_npz(tmp_path, rng):
    for s, ids in IDS.items():
        labels = [i for i in ids for _ in range(5)]
        np.savez(tmp_path / f"{s}_images.npz", images=_images(rng, len(labels), 84))
        meta = {"label_specific": np.array(labels), "label_general": np.zeros(len(labels)),
                "label_specific_str": [f"cls{i}" for i in range(100)]}
        if s == "train":
            meta = {"labels": labels}
        (tmp_path / f"{s}_labels.pkl").write_bytes(pickle.dumps(meta))
    sp = load_splits("tiered-imagenet", tmp_path)
    assert sp["train"].images.shape == (20, 3, 84, 84)
    assert sp["train"].class_names == ("0", "1", "2", "3")
    assert sp["test"].class_names == ("cls80", "cls81", "cls82")
    (tmp_path / "val_images.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt or unreadable npz .*val_images.npz"):
        load_dataset("tiered-imagenet", tmp_path, "val")


@pytest.mark.parametrize("name,prefix", [("cifar-fs", "CIFAR_FS"), ("fc100", "FC100")])
def test_cifar_pickles(tmp_path, rng, name, prefix):
    for s, ids in IDS.items():
        _data_pickle(tmp_path / f"{prefix}_{s}.pickle", rng, ids, 7, 32, protocol=2)
    sp = load_splits(name, tmp_path)
    assert sp["train"].images.shape == (28, 3, 32, 32)
    assert sp["train"].transform["name"] == name and sp["train"].transform["size"] == [32, 32]
    ep = EpisodeSampler(sp["val"], 3, 2, 5, meta_batch=2).sample(0)
    assert ep.query_x.shape == (2, 15, 3, 32, 32)


def test_missing_and_incomplete_roots(tmp_path, rng, monkeypatch):
    with pytest.raises(DatasetNotFoundError, match=r"miniImageNet_category_split_val.pickle.*MetaOptNet"):
        load_dataset("mini-imagenet", tmp_path, "val")
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_dataset("cifar-fs", tmp_path / "nope", "train")
    _data_pickle(tmp_path / "FC100_train.pickle", rng, IDS["train"], 3, 32)
    assert load_dataset("fc100", tmp_path, "train").n_classes == 4
    with pytest.raises(DatasetNotFoundError, match=r"expected FC100_train.pickle, FC100_val.pickle"):
        load_splits("fc100", tmp_path, ["train", "val"])
    with pytest.raises(DatasetNotFoundError, match=r"train_images.npz, train_labels.pkl"):
        load_dataset("tiered-imagenet", tmp_path, "train")
    monkeypatch.delenv("BILEVEL_DATA_ROOT", raising=False)
    with pytest.raises(DatasetNotFoundError, match="pass root="):
        load_dataset("fc100", None, "train")
    monkeypatch.setenv("BILEVEL_DATA_ROOT", str(tmp_path))
    assert load_dataset("fc100", None, "train").n_classes == 4


def test_corrupt_and_malformed_pickles(tmp_path, rng):
    (tmp_path / "CIFAR_FS_train.pickle").write_bytes(b"\x80\x04 this is not a pickle")
    with pytest.raises(ValueError, match="corrupt or unreadable pickle .*CIFAR_FS_train.pickle"):
        load_dataset("cifar-fs", tmp_path, "train")
    (tmp_path / "CIFAR_FS_train.pickle").write_bytes(pickle.dumps({"images": 1}))
    with pytest.raises(ValueError, match=r"CIFAR_FS_train.pickle: expected a dict with keys 'data' and 'labels', got \['images'\]"):
        load_dataset("cifar-fs", tmp_path, "train")
    bad = {"data": _images(rng, 4, 32), "labels": [0, 1, 2]}
    (tmp_path / "CIFAR_FS_train.pickle").write_bytes(pickle.dumps(bad))
    with pytest.raises(ValueError, match="'data' has 4 images but 'labels' has 3"):
        load_dataset("cifar-fs", tmp_path, "train")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "CIFAR_FS_train.pickle").write_bytes(pickle.dumps({"data": Evil(), "labels": []}))
    with pytest.raises(ValueError, match="refusing to unpickle builtins.print"):
        load_dataset("cifar-fs", tmp_path, "train")


def test_overlapping_split_classes_are_rejected(tmp_path, rng):
    for s in ("train", "val", "test"):
        _data_pickle(tmp_path / f"FC100_{s}.pickle", rng, IDS["train"] if s != "test" else IDS["test"], 3, 32)
    with pytest.raises(ValueError, match="appears in both the 'train' and 'val' splits"):
        load_splits("fc100", tmp_path)


def test_cache_survives_unwritable_dir_and_corrupt_cache(tmp_path, rng):
    calls = []

    def build():
        calls.append(1)
        return {"x": torch.arange(3)}

    cdir = tmp_path / "c"
    assert torch.equal(base.cached("t", {"a": 1}, build, cache=True, cache_dir=cdir)["x"], torch.arange(3))
    assert torch.equal(base.cached("t", {"a": 1}, build, cache=True, cache_dir=cdir)["x"], torch.arange(3))
    assert len(calls) == 1
    (f,) = cdir.glob("t-*.pt")
    f.write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="unreadable cache file"):
        base.cached("t", {"a": 1}, build, cache=True, cache_dir=cdir)
    assert len(calls) == 2
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.warns(UserWarning, match="could not write the decode cache"):
        base.cached("t", {"a": 2}, build, cache=True, cache_dir=blocker / "sub")
