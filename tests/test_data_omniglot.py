"""Omniglot: official layout (folders / zips / torchvision's omniglot-py), reduced sets, splits,
rotations, cache, errors; plus integration tests on the real reduced sets in ../shared/data."""
from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from bilevel.data import DatasetNotFoundError, EpisodeSampler, build_transform, load_splits, normalize

# set -> alphabet -> number of characters (4 drawings each)
OFFICIAL = {
    "images_background": {"Alpha": 3, "Beta": 2, "Gamma": 4},
    "images_evaluation": {"Delta": 3, "Epsilon": 2},
}


def _glyph_png(rng: np.random.Generator) -> Image.Image:
    arr = np.ones((105, 105), dtype=bool)  # white background, as in the real files (mode "1")
    r, c = rng.integers(10, 80, size=2)
    arr[r:r + 15, c:c + 3] = False
    arr[r + rng.integers(0, 12), c:c + 20] = False
    return Image.fromarray(arr)


def _write_set(root, name, alphabets, rng, as_zip=False, seed_of=None):
    files = {}
    for alpha, n_chars in alphabets.items():
        for ch in range(1, n_chars + 1):
            crng = np.random.default_rng(seed_of(alpha, ch)) if seed_of else rng
            for d in range(1, 5):
                rel = f"{name}/{alpha}/character{ch:02d}/{ch:04d}_{d:02d}.png"
                files[rel] = _glyph_png(crng)
    if as_zip:
        with zipfile.ZipFile(root / f"{name}.zip", "w") as zf:
            for rel, im in files.items():
                path = root / "tmp.png"
                im.save(path)
                zf.write(path, rel)
            path.unlink()
    else:
        for rel, im in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            im.save(root / rel)
    return files


@pytest.fixture
def official(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    tv = root / "omniglot-py"  # torchvision's folder convention
    tv.mkdir(parents=True)
    files = {}
    for name, alphabets in OFFICIAL.items():
        files.update(_write_set(tv, name, alphabets, rng))
    return root, files


def test_official_folders_split_by_character(official, tmp_path):
    root, files = official
    sp = load_splits("omniglot", root, split_fractions=(0.5, 0.25, 0.25), cache_dir=tmp_path / "c")
    chars = [set(d.class_names) for d in sp.values()]
    assert sum(len(c) for c in chars) == 14  # 9 background + 5 evaluation characters
    assert not (chars[0] & chars[1] or chars[0] & chars[2] or chars[1] & chars[2])
    assert [d.n_classes for d in sp.values()] == [7, 4, 3]
    tr = sp["train"]
    assert tr.images.shape == (28, 1, 28, 28) and tr.images.dtype == torch.uint8
    assert tr.metadata["sets"] == ["images_background", "images_evaluation"]
    # transform of the original PNG == stored tensor (strokes become 255 / 1.0)
    name = tr.class_names[0]
    alpha, char = name.split("/")
    rel = f"images_background/{name}/{char[-2:].rjust(4, '0')}_01.png"
    if rel not in files:
        rel = f"images_evaluation/{name}/{char[-2:].rjust(4, '0')}_01.png"
    t = build_transform(tr.transform)
    assert torch.equal(t(files[rel]), normalize(tr.images[0], tr.transform))
    assert float(tr.images.float().mean()) < 60  # mostly background (0) after inversion
    # deterministic: same options -> same classes; another seed -> another split
    again = load_splits("omniglot", root, split_fractions=(0.5, 0.25, 0.25), cache=False)
    assert again["test"].class_names == sp["test"].class_names
    assert torch.equal(again["test"].images, sp["test"].images)
    other = load_splits("omniglot", root, ["test"], split_fractions=(0.5, 0.25, 0.25), split_seed=1,
                        cache=False)
    assert other["test"].class_names != sp["test"].class_names


def test_split_by_alphabet_and_rotations(official):
    root, _ = official
    sp = load_splits("omniglot", root, split_by="alphabet", split_fractions=(3, 1, 1), cache=False)
    alph = [set(d.metadata["alphabets"]) for d in sp.values()]
    assert [len(a) for a in alph] == [3, 1, 1] and len(set.union(*alph)) == 5
    for d, a in zip(sp.values(), alph):
        assert {n.split("/")[0] for n in d.class_names} == a
    rot = load_splits("omniglot", root, ["val"], split_by="alphabet", split_fractions=(3, 1, 1),
                      rotations=True, cache=False)["val"]
    base = sp["val"]
    assert rot.n_classes == 4 * base.n_classes and len(rot) == 4 * len(base)
    assert rot.class_names[:4] == (base.class_names[0], *(f"{base.class_names[0]}/rot{a}" for a in (90, 180, 270)))
    first = base.images[base.labels == 0]
    assert torch.equal(rot.images[rot.labels == 1], torch.rot90(first, 1, dims=(-2, -1)))
    assert torch.equal(rot.images[rot.labels == 2], torch.rot90(first, 2, dims=(-2, -1)))
    with pytest.raises(ValueError, match="every split needs at least one alphabet"):
        load_splits("omniglot", root, split_by="alphabet", cache=False, split_fractions=(1, 0, 1))


def test_zips_resize_and_cache(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    root = tmp_path / "zips"
    root.mkdir()
    for name, alphabets in OFFICIAL.items():
        _write_set(root, name, alphabets, rng, as_zip=True)
    cdir = tmp_path / "cache"
    sp = load_splits("omniglot", root, size=20, split_fractions=(0.5, 0.25, 0.25), cache_dir=cdir)
    assert sp["train"].images.shape[-2:] == (20, 20) and sp["train"].transform["size"] == [20, 20]
    assert len(list(cdir.glob("omniglot-*.pt"))) == 1

    def boom(*a, **k):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr("bilevel.data.omniglot.decode_image", boom)
    again = load_splits("omniglot", root, size=20, split_fractions=(0.5, 0.25, 0.25), cache_dir=cdir)
    assert torch.equal(again["val"].images, sp["val"].images)


def test_small_sets_merge_shared_alphabets(tmp_path):
    root = tmp_path / "small"
    root.mkdir()
    same = lambda a, c: hash((a, c)) % 1000  # noqa: E731 - identical files for a shared character
    rng = np.random.default_rng(0)
    _write_set(root, "images_background_small1", {"Greek": 2, "Latin": 2, "Korean": 3}, rng,
               as_zip=True, seed_of=same)
    _write_set(root, "images_background_small2", {"Greek": 2, "Latin": 2, "Tagalog": 1}, rng,
               seed_of=same)
    sp = load_splits("omniglot", root, split_fractions=(0.5, 0.25, 0.25), cache=False)
    names = [n for d in sp.values() for n in d.class_names]
    assert len(names) == len(set(names)) == 2 + 2 + 3 + 1
    assert sum(len(d) for d in sp.values()) == 8 * 4
    assert sp["train"].metadata["sets"] == ["images_background_small1", "images_background_small2"]


def test_errors(tmp_path, official):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetNotFoundError, match="images_background_small1.*brendenlake"):
        load_splits("omniglot", empty)
    root, files = official
    with pytest.raises(DatasetNotFoundError, match=r"sets \['images_background_small2'\] not found"):
        load_splits("omniglot", root, sets=["images_background_small2"])
    with pytest.raises(ValueError, match="split_by must be"):
        load_splits("omniglot", root, split_by="drawer")
    bad = root / "omniglot-py" / next(iter(files))
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match=rf"corrupt or unreadable image .*{bad.name}"):
        load_splits("omniglot", root, cache=False)


def test_explicit_download_uses_torchvision(tmp_path, monkeypatch):
    calls = []

    class FakeOmniglot:  # stands in for torchvision.datasets.Omniglot(download=True)
        def __init__(self, root, background, download):
            calls.append((background, download))
            name = "images_background" if background else "images_evaluation"
            (tmp_path / "omniglot-py").mkdir(exist_ok=True)
            _write_set(tmp_path / "omniglot-py", name, OFFICIAL[name], np.random.default_rng(0))

    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "Omniglot", FakeOmniglot)
    with pytest.raises(DatasetNotFoundError):
        load_splits("omniglot", tmp_path)  # never downloads unless asked
    assert calls == []
    sp = load_splits("omniglot", tmp_path, download=True, cache=False)
    assert calls == [(True, True), (False, True)]
    assert sum(d.n_classes for d in sp.values()) == 14


# ----------------------------------------------------------------- real data (../shared/data)


@pytest.fixture(scope="module")
def real_root(shared_data_root):
    root = shared_data_root / "omniglot"
    if not (root / "images_background_small1.zip").is_file():
        pytest.skip(f"reduced Omniglot sets not found in {root}")
    return root


@pytest.fixture(scope="module")
def real_splits(real_root, tmp_path_factory):
    return load_splits("omniglot", real_root, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.mark.integration
def test_real_small_sets_give_8_alphabets_242_characters(real_splits):
    chars = [n for d in real_splits.values() for n in d.class_names]
    assert len(chars) == len(set(chars)) == 242
    assert len({c.split("/")[0] for c in chars}) == 8
    assert sum(len(d) for d in real_splits.values()) == 4840
    assert [d.n_classes for d in real_splits.values()] == [153, 26, 63]  # 1028:172:423
    assert all(int(d.class_counts().min()) == int(d.class_counts().max()) == 20
               for d in real_splits.values())


@pytest.mark.integration
def test_real_png_transform_matches_and_sampler_runs(real_root, real_splits):
    tr = real_splits["train"]
    name = tr.class_names[0]
    with zipfile.ZipFile(real_root / "images_background_small1.zip") as z1, \
            zipfile.ZipFile(real_root / "images_background_small2.zip") as z2:
        for z, top in ((z1, "images_background_small1"), (z2, "images_background_small2")):
            members = sorted(m for m in z.namelist() if m.startswith(f"{top}/{name}/") and m.endswith(".png"))
            if members:
                import io
                with Image.open(io.BytesIO(z.read(members[0]))) as im:
                    assert im.size == (105, 105)
                    got = build_transform(tr.transform)(im)
                break
    assert torch.equal(got, normalize(tr.images[0], tr.transform))
    s = EpisodeSampler(tr, ways=20, shots=5, queries=15, meta_batch=2, seed=0)
    ep = s.sample(0)
    assert ep.support_x.shape == (2, 100, 1, 28, 28) and ep.query_x.shape == (2, 300, 1, 28, 28)
    assert 0.05 < float(ep.support_x.mean()) < 0.4  # strokes are bright on a dark background


@pytest.mark.integration
def test_real_alphabet_split(real_root, real_splits, tmp_path):
    sp = load_splits("omniglot", real_root, split_by="alphabet", cache=False)
    alph = [d.metadata["alphabets"] for d in sp.values()]
    assert [len(a) for a in alph] == [5, 1, 2]
    assert sorted(a for al in alph for a in al) == sorted(
        ["Balinese", "Early_Aramaic", "Greek", "Japanese_(katakana)", "Korean", "Latin",
         "Sanskrit", "Tagalog"])


# ------------------------------------------------ holdout folds (transfer to unseen alphabets)

FOLDS = {"images_background": {"Alpha": 5, "Beta": 6, "Gamma": 4, "Delta": 5}}


@pytest.fixture
def four_alphabets(tmp_path):
    root = tmp_path / "data"
    (root / "omniglot-py").mkdir(parents=True)
    _write_set(root / "omniglot-py", "images_background", FOLDS["images_background"], np.random.default_rng(1))
    return root


def test_holdout_folds_partition_the_alphabets_and_validation_stays_on_training_alphabets(four_alphabets):
    seen = []
    for k in range(2):
        sp = load_splits("omniglot", four_alphabets, split_by="alphabet", holdout=f"{k}/2", cache=False)
        train, val, test = (set(sp[s].metadata["alphabets"]) for s in ("train", "val", "test"))
        assert len(test) == 2 and not test & train and val == train and train | test == set(FOLDS["images_background"])
        names = [set(sp[s].class_names) for s in ("train", "val", "test")]
        assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
        for a in train:  # 20% of each training alphabet's characters (at least one) validate
            n = FOLDS["images_background"][a]
            assert sum(c.startswith(a + "/") for c in names[1]) == max(1, round(0.2 * n))
        assert sp["test"].metadata["holdout"] == f"{k}/2"
        seen.append(test)
        again = load_splits("omniglot", four_alphabets, split_by="alphabet", holdout=f"{k}/2", cache=False)
        assert all(again[s].class_names == sp[s].class_names for s in sp)  # deterministic
    assert seen[0] | seen[1] == set(FOLDS["images_background"])
    other = load_splits("omniglot", four_alphabets, ["test"], split_by="alphabet", holdout="0/2", split_seed=5,
                        cache=False)
    four = [set(load_splits("omniglot", four_alphabets, ["test"], split_by="alphabet", holdout=f"{k}/4",
                            cache=False)["test"].metadata["alphabets"]) for k in range(4)]
    assert sorted(len(a) for a in four) == [1, 1, 1, 1] and set.union(*four) == set(FOLDS["images_background"])
    assert isinstance(other["test"].metadata["alphabets"], list)


@pytest.mark.parametrize("kwargs, match", [
    ({"holdout": "0/2"}, "needs split_by='alphabet'"),
    ({"holdout": "2/2", "split_by": "alphabet"}, "0 <= k < n"),
    ({"holdout": "first", "split_by": "alphabet"}, "must be 'k/n'"),
    ({"holdout": "0/5", "split_by": "alphabet"}, "only 4 alphabets to deal into 5 folds"),
    ({"holdout": "0/2", "split_by": "alphabet", "holdout_val": 1.0}, r"holdout_val must be in \(0, 1\)"),
    ({"holdout": "0/2", "split_by": "alphabet", "holdout_val": 0.95}, "leaves none to train on"),
])
def test_holdout_errors(four_alphabets, kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_splits("omniglot", four_alphabets, cache=False, **kwargs)


def test_holdout_option_names_itself():
    from bilevel.options import OptionError
    from bilevel.run_config import DataConfig

    with pytest.raises(OptionError, match="add --split-by alphabet"):
        DataConfig(dataset="omniglot", holdout="0/4")
    with pytest.raises(OptionError, match="0 <= k < n"):
        DataConfig(dataset="omniglot", split_by="alphabet", holdout="4/4")
    assert DataConfig(dataset="omniglot", split_by="alphabet", holdout="1/4").dataset_options()["holdout"] == "1/4"


@pytest.mark.integration
def test_real_holdout_folds_train_on_six_alphabets(real_root):
    """The protocol of the few-shot transfer table: folds 0 and 1 of 4 hold out Greek + Korean and Balinese + Latin."""
    from bilevel.run_config import DataConfig, build_samplers

    tests = []
    for k in range(4):
        sp = load_splits("omniglot", real_root, split_by="alphabet", holdout=f"{k}/4", cache=False)
        assert len(sp["train"].metadata["alphabets"]) == 6 and len(sp["test"].metadata["alphabets"]) == 2
        tests.append(sp["test"].metadata["alphabets"])
    assert tests[:2] == [["Greek", "Korean"], ["Balinese", "Latin"]]
    assert sorted(a for t in tests for a in t) == sorted(
        ["Balinese", "Early_Aramaic", "Greek", "Japanese_(katakana)", "Korean", "Latin", "Sanskrit", "Tagalog"])
    data = DataConfig(dataset="omniglot", data_root=str(real_root.parent), split_by="alphabet", holdout="0/4",
                      rotations=True, ways=20, shots=1, queries=1, within_alphabet=True)
    s = build_samplers(data, seed=0)
    assert s.test.within_alphabet and not s.val.within_alphabet and not s.train.within_alphabet
    names = s.test.dataset.class_names
    for e in range(6):
        plan = s.test.plan(e)
        assert len({names[c].split("/")[0] for c in plan.classes[0].tolist()}) == 1
        assert not set(plan.support[0].tolist()) & set(plan.query[0].tolist())
