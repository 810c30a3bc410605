"""Within-alphabet episodes (Lake et al. 2015): one alphabet per episode, disjoint support/query, purity, errors."""
from __future__ import annotations

import dataclasses
import json
from collections import Counter

import pytest
import torch
from click.testing import CliRunner

from bilevel.cli import main
from bilevel.data import EpisodeSampler, FewShotDataset, load_splits, make_sampler, resolve_transform_spec
from bilevel.run_config import DataConfig, build_samplers

ALPHABETS = {"Alpha": 6, "Beta": 9, "Gamma": 5}  # classes per alphabet


def _dataset(alphabets: dict[str, int] = ALPHABETS, per_class: int = 6, with_alphabets: bool = True) -> FewShotDataset:
    names = [f"{a}/character{c:02d}" for a, n in alphabets.items() for c in range(1, n + 1)]
    labels = torch.arange(len(names)).repeat_interleave(per_class)
    images = (torch.arange(labels.numel(), dtype=torch.float32)[:, None, None, None]).expand(-1, 1, 4, 4).contiguous()
    meta = {"class_alphabets": tuple(n.split("/")[0] for n in names)} if with_alphabets else {}
    return FewShotDataset(images=images, labels=labels, class_names=tuple(names), name="toy", split="test",
                          transform=resolve_transform_spec({"name": "glyphs", "size": 4}), metadata=meta)


def test_every_episode_comes_from_one_alphabet_and_every_alphabet_is_drawn() -> None:
    ds = _dataset()
    s = EpisodeSampler(ds, ways=5, shots=2, queries=3, meta_batch=8, seed=3, within_alphabet=True)
    alphabet_of = ds.metadata["class_alphabets"]
    seen = Counter()
    for it in range(25):
        plan, ep = s.plan(it), s.sample(it)
        for b in range(8):
            classes = plan.classes[b].tolist()
            assert len(set(classes)) == 5
            (alphabet,) = {alphabet_of[c] for c in classes}  # exactly one alphabet
            seen[alphabet] += 1
            sup, qry = set(plan.support[b].tolist()), set(plan.query[b].tolist())
            assert len(sup) == 10 and len(qry) == 15 and not sup & qry
            # the images are the planned examples, labelled by their position in the episode's classes
            assert torch.equal(ep.support_x[b, :, 0, 0, 0].long(), plan.support[b])
            assert torch.equal(ds.labels[plan.query[b]], plan.classes[b][ep.query_y[b]])
    assert set(seen) == set(ALPHABETS) and min(seen.values()) > 200 / 3 * 0.6  # uniform over the 3 alphabets
    # the default sampler mixes alphabets
    mixed = EpisodeSampler(ds, ways=5, shots=2, queries=3, meta_batch=8, seed=3)
    assert any(len({alphabet_of[c] for c in mixed.plan(it).classes[b].tolist()}) > 1 for it in range(3) for b in range(8))


def test_episode_j_depends_only_on_seed_iteration_and_index() -> None:
    """What --nproc relies on: any subset of a meta-batch, and any meta-batch size, give the same episodes."""
    ds = _dataset()
    full = EpisodeSampler(ds, ways=4, shots=1, queries=2, meta_batch=6, seed=11, within_alphabet=True)
    small = EpisodeSampler(ds, ways=4, shots=1, queries=2, meta_batch=3, seed=11, within_alphabet=True)
    for it in (0, 7):
        everything = full.sample(it)
        part = full.sample(it, indices=[4, 5])
        assert all(torch.equal(a[4:6], b) for a, b in zip(everything, part))
        assert all(torch.equal(a[:3], b) for a, b in zip(everything, small.sample(it)))
        assert torch.equal(full.plan(it, indices=[1]).classes, small.plan(it, indices=[1]).classes)
    assert not torch.equal(full.plan(0).classes, full.plan(1).classes)
    other_seed = EpisodeSampler(ds, ways=4, shots=1, queries=2, meta_batch=6, seed=12, within_alphabet=True)
    assert not torch.equal(full.plan(0).classes, other_seed.plan(0).classes)
    # the option is part of the sampler's identity: a resumed state of the other kind is refused
    plain = EpisodeSampler(ds, ways=4, shots=1, queries=2, meta_batch=6, seed=11)
    with pytest.raises(ValueError, match="within_alphabet=False but this sampler has within_alphabet=True"):
        full.load_state_dict(plain.state_dict())


def test_errors_name_the_small_alphabet_or_the_missing_alphabets() -> None:
    with pytest.raises(ValueError, match=r"fewer than 6 classes: 'Gamma' \(5\).*lower --ways, or use --rotations"):
        EpisodeSampler(_dataset(), ways=6, shots=1, queries=1, within_alphabet=True)
    with pytest.raises(ValueError, match="carry no alphabet"):
        EpisodeSampler(_dataset(with_alphabets=False), ways=3, shots=1, queries=1, within_alphabet=True)
    sinusoid = load_splits("sinusoid", None, ("test",))["test"]
    with pytest.raises(ValueError, match="sinusoid tasks have none"):
        make_sampler(sinusoid, ways=None, shots=5, queries=5, within_alphabet=True)


def test_data_config_applies_it_to_validation_and_test_only() -> None:
    data = DataConfig(dataset="glyphs", ways=3, shots=1, queries=2, within_alphabet=True)
    with pytest.raises(ValueError, match="carry no alphabet"):  # the glyphs have no alphabets
        build_samplers(data, seed=0)
    assert DataConfig().within_alphabet is False


@pytest.fixture(scope="module")
def omniglot_root(shared_data_root):
    root = shared_data_root / "omniglot"
    if not (root / "images_background_small1.zip").is_file():
        pytest.skip(f"reduced Omniglot sets not found in {root}")
    return shared_data_root


@pytest.mark.integration
def test_real_omniglot_test_alphabets(omniglot_root) -> None:
    """Alphabet split of the reduced sets: test = Early_Aramaic (22 characters) + Sanskrit (42)."""
    data = DataConfig(dataset="omniglot", data_root=str(omniglot_root), split_by="alphabet", ways=20, shots=1,
                      queries=1, within_alphabet=True)
    samplers = build_samplers(data, seed=0)
    test = samplers.test
    assert test.within_alphabet and samplers.val.within_alphabet and not samplers.train.within_alphabet
    names = test.dataset.class_names
    alphabets = set()
    for e in range(12):
        plan = test.plan(e)
        (alphabet,) = {names[c].split("/")[0] for c in plan.classes[0].tolist()}
        alphabets.add(alphabet)
        assert not set(plan.support[0].tolist()) & set(plan.query[0].tolist())
    assert alphabets == {"Early_Aramaic", "Sanskrit"}
    with pytest.raises(ValueError, match=r"'Early_Aramaic' \(22\)"):
        build_samplers(dataclasses.replace(data, ways=25), seed=0, splits=("test",))
    rotated = build_samplers(dataclasses.replace(data, ways=25, rotations=True), seed=0, splits=("test",))
    assert rotated.test.dataset.n_classes == 4 * 64


@pytest.mark.integration
def test_cli_eval_accepts_within_alphabet(omniglot_root, tmp_path) -> None:
    out = tmp_path / "run"
    common = ["--dataset", "omniglot", "--data-root", str(omniglot_root), "--split-by", "alphabet", "--ways", "5",
              "--shots", "1", "--queries", "2"]
    r = CliRunner().invoke(main, ["maml", "train", *common, "--filters", "4", "--meta-batch", "1", "--iterations", "1",
                                  "--val-every", "1", "--val-episodes", "2", "--test-episodes", "2", "--no-progress",
                                  "--no-tensorboard", "--out", str(out)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["maml", "eval", "--checkpoint", str(out), "--episodes", "4", "--within-alphabet",
                                  "--ways", "20", "--no-progress", "--out", str(tmp_path / "ev")])
    assert r.exit_code == 2 and "cannot classify 20 classes" in r.output  # a 5-way MAML
    r = CliRunner().invoke(main, ["maml", "eval", "--checkpoint", str(out), "--episodes", "4", "--within-alphabet",
                                  "--no-progress", "--out", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output
    ev = json.loads((tmp_path / "ev" / "eval.json").read_text())["test"]
    assert ev["data"]["within_alphabet"] is True and ev["episodes"] == 4
