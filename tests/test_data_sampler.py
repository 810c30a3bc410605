"""Episodic sampler: shapes, disjointness, purity (seed/iteration/index), state, bad input."""
from __future__ import annotations

import math

import pytest
import torch

from bilevel.data import (
    Augment,
    EpisodeSampler,
    Episodes,
    FewShotDataset,
    SinusoidSampler,
    TorchvisionAugment,
    load_dataset,
    load_splits,
    make_sampler,
    normalize,
)


@pytest.fixture(scope="module")
def glyphs():
    return load_splits("glyphs", classes={"train": 30, "val": 8, "test": 12}, examples_per_class=10)


def _equal(a: Episodes, b: Episodes) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_shapes_dtypes_and_labels(glyphs):
    s = EpisodeSampler(glyphs["train"], ways=5, shots=2, queries=3, meta_batch=4, seed=1)
    ep = s.sample(0)
    assert ep.support_x.shape == (4, 10, 1, 28, 28)
    assert ep.query_x.shape == (4, 15, 1, 28, 28)
    assert ep.support_x.dtype == torch.float32 and ep.support_y.dtype == torch.int64
    assert ep.support_y[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert ep.query_y[3].tolist() == [i for i in range(5) for _ in range(3)]
    assert ep.batch_size == 4
    one = ep.episode(2)
    assert one.support_x.shape == (10, 1, 28, 28) and one.query_y.shape == (15,)
    moved = ep.to("cpu")
    assert _equal(moved, ep)


def test_episode_content_matches_plan_and_support_query_disjoint(glyphs):
    ds = glyphs["train"]
    s = EpisodeSampler(ds, ways=6, shots=3, queries=4, meta_batch=5, seed=7)
    for it in range(4):
        plan, ep = s.plan(it), s.sample(it)
        assert plan.classes.shape == (5, 6)
        for b in range(5):
            sup, qry = plan.support[b].tolist(), plan.query[b].tolist()
            assert len(set(sup)) == 18 and len(set(qry)) == 24
            assert not set(sup) & set(qry)
            assert len(set(plan.classes[b].tolist())) == 6
            # label i <-> dataset class plan.classes[b, i]
            assert torch.equal(ds.labels[plan.support[b]], plan.classes[b][ep.support_y[b]])
            assert torch.equal(ds.labels[plan.query[b]], plan.classes[b][ep.query_y[b]])
            assert torch.equal(ep.support_x[b], normalize(ds.images[plan.support[b]], ds.transform))


def test_reproducible_and_iteration_dependent(glyphs):
    a = EpisodeSampler(glyphs["train"], 5, 1, 2, meta_batch=3, seed=3)
    b = EpisodeSampler(glyphs["train"], 5, 1, 2, meta_batch=3, seed=3)
    c = EpisodeSampler(glyphs["train"], 5, 1, 2, meta_batch=3, seed=4)
    assert _equal(a.sample(11), b.sample(11))
    assert not _equal(a.sample(11), c.sample(11))
    assert not _equal(a.sample(11), a.sample(12))
    # sampling order does not matter: the sampler holds no RNG state
    b.sample(0), b.sample(5)
    assert _equal(a.sample(11), b.sample(11))


@pytest.mark.parametrize("augment", [None, Augment(crop_padding=2, flip=True, brightness=0.3,
                                                   contrast=0.3)])
def test_rank_subset_equals_slices(glyphs, augment):
    s = EpisodeSampler(glyphs["train"], 5, 2, 2, meta_batch=6, seed=0, augment=augment)
    full = s.sample(9)
    part = s.sample(9, indices=[2, 3])
    assert _equal(part, Episodes(*(t[2:4] for t in full)))
    odd = s.sample(9, indices=[5, 1])
    assert _equal(odd, Episodes(*(t[[5, 1]] for t in full)))


def test_state_dict_round_trip(glyphs):
    a = EpisodeSampler(glyphs["train"], 5, 1, 1, meta_batch=2, seed=5)
    for _ in range(3):
        a.next()
    state = a.state_dict()
    assert state["iteration"] == 3
    b = EpisodeSampler(glyphs["train"], 5, 1, 1, meta_batch=2, seed=5)
    b.load_state_dict(state)
    assert _equal(a.next(), b.next()) and a.iteration == b.iteration == 4
    assert _equal(next(iter(a)), b.sample(4))
    other = EpisodeSampler(glyphs["train"], 5, 1, 1, meta_batch=2, seed=6)
    with pytest.raises(ValueError, match="seed=5"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="iteration"):
        b.load_state_dict({"iteration": -1})


def test_training_and_test_shots_differ(glyphs):
    train = EpisodeSampler(glyphs["train"], 5, shots=5, queries=4, meta_batch=2)
    test = EpisodeSampler(glyphs["test"], 5, shots=1, queries=9, meta_batch=2)
    assert train.sample(0).support_x.shape[1] == 25 and test.sample(0).support_x.shape[1] == 5
    assert not set(glyphs["train"].class_names) & set(glyphs["test"].class_names)


def test_bad_input_errors_name_the_numbers(glyphs):
    ds = glyphs["val"]  # 8 classes, 10 examples each
    with pytest.raises(ValueError, match=r"ways=9 but split 'val' of 'glyphs' has only 8 classes"):
        EpisodeSampler(ds, ways=9, shots=1, queries=1)
    with pytest.raises(ValueError, match=r"shots \+ queries = 5 \+ 6 = 11 .* only 10 examples"):
        EpisodeSampler(ds, ways=2, shots=5, queries=6)
    with pytest.raises(ValueError, match="shots must be an integer >= 1"):
        EpisodeSampler(ds, ways=2, shots=0, queries=6)
    with pytest.raises(ValueError, match="meta_batch"):
        EpisodeSampler(ds, ways=2, shots=1, queries=1, meta_batch=0)
    s = EpisodeSampler(ds, ways=2, shots=1, queries=1, meta_batch=3)
    with pytest.raises(ValueError, match=r"indices \[3\] outside 0..2"):
        s.sample(0, indices=[0, 3])
    with pytest.raises(ValueError, match="indices is empty"):
        s.sample(0, indices=[])
    with pytest.raises(ValueError, match="iteration must be >= 0"):
        s.sample(-1)
    with pytest.raises(TypeError, match="SinusoidSampler"):
        EpisodeSampler(load_dataset("sinusoid"), 1, 1, 1)


def test_unequal_class_sizes_and_uniform_class_choice(gen):
    counts = [3, 7, 5, 12, 4, 9]
    labels = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)])
    perm = torch.randperm(len(labels), generator=gen)  # examples of a class are not contiguous
    images = torch.arange(len(labels), dtype=torch.float32)[perm].view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
    ds = FewShotDataset.from_tensors(images.contiguous(), labels[perm])
    s = EpisodeSampler(ds, ways=3, shots=1, queries=2, meta_batch=50, seed=0)
    seen_smallest = set()
    freq = torch.zeros(6)
    for it in range(40):
        plan = s.plan(it)
        for b in range(50):
            idx = torch.cat([plan.support[b], plan.query[b]])
            assert len(set(idx.tolist())) == 9
            cls = plan.classes[b]
            freq[cls] += 1
            assert torch.equal(ds.labels[plan.support[b]], cls)
            if 0 in cls.tolist():
                seen_smallest |= set(idx[ds.labels[idx] == 0].tolist())
    assert seen_smallest == set(torch.nonzero(ds.labels == 0).flatten().tolist())
    # 2000 episodes x 3 of 6 classes: each class expected 1000 times (binomial sd ~ 22)
    assert (freq - 1000).abs().max() < 100, freq
    # float images are used as is (no /255, no standardisation)
    ep = s.sample(0)
    assert torch.equal(ep.support_x, ds.images[s.plan(0).support.reshape(-1)].view(50, 3, 1, 2, 2))


def test_augmentation_is_seeded_and_changes_images(glyphs):
    aug = Augment(crop_padding=3, flip=True)
    plain = EpisodeSampler(glyphs["train"], 5, 1, 1, meta_batch=2, seed=2)
    s1 = EpisodeSampler(glyphs["train"], 5, 1, 1, meta_batch=2, seed=2, augment=aug)
    s2 = EpisodeSampler(glyphs["train"], 5, 1, 1, meta_batch=2, seed=2, augment=aug)
    a, b, p = s1.sample(0), s2.sample(0), plain.sample(0)
    assert _equal(a, b)
    assert torch.equal(a.support_y, p.support_y)  # same classes/examples, augmented pixels
    assert not torch.equal(a.support_x, p.support_x)
    assert math.isclose(float(a.support_x.max()), 1.0)  # strokes survive the crop


def test_torchvision_augment_wrapper_is_reproducible(glyphs):
    from torchvision.transforms import v2

    aug = TorchvisionAugment(v2.RandomAffine(degrees=20, translate=(0.1, 0.1)))
    s = EpisodeSampler(glyphs["train"], 3, 1, 1, meta_batch=4, seed=0, augment=aug)
    full = s.sample(1)
    assert _equal(s.sample(1, indices=[1, 2]), Episodes(*(t[1:3] for t in full)))
    plain = EpisodeSampler(glyphs["train"], 3, 1, 1, meta_batch=4, seed=0).sample(1)
    assert not torch.equal(full.query_x, plain.query_x)


def test_sinusoid_sampler():
    tasks = load_dataset("sinusoid", split="train")
    s = SinusoidSampler(tasks, shots=10, queries=7, meta_batch=25, seed=0)
    ep = s.sample(0)
    assert ep.support_x.shape == (25, 10, 1) and ep.query_y.shape == (25, 7, 1)
    amp, ph = s.task_params(0)
    assert amp.shape == (25,) and float(amp.min()) >= 0.1 and float(amp.max()) <= 5.0
    assert float(ph.min()) >= 0.0 and float(ph.max()) <= math.pi
    assert float(ep.support_x.abs().max()) <= 5.0
    want = amp.view(-1, 1, 1) * torch.sin(ep.query_x - ph.view(-1, 1, 1))
    torch.testing.assert_close(ep.query_y, want)
    sub = s.sample(0, indices=[4])
    assert torch.equal(sub.support_y, ep.support_y[4:5])
    test = SinusoidSampler(load_dataset("sinusoid", split="test"), 10, 7, 25, seed=0)
    assert not torch.equal(test.sample(0).support_x, ep.support_x)  # other stream per split
    assert s.task == "regression"
    # amplitude spread: 25 x 40 draws of U[0.1, 5] have mean ~2.55
    amps = torch.cat([s.task_params(i)[0] for i in range(40)])
    assert abs(float(amps.mean()) - 2.55) < 0.15


def test_make_sampler_dispatch(glyphs):
    assert isinstance(make_sampler(load_dataset("sinusoid"), ways=None, shots=5, queries=5),
                      SinusoidSampler)
    assert isinstance(make_sampler(glyphs["train"], ways=5, shots=1, queries=1), EpisodeSampler)
    with pytest.raises(ValueError, match="ways is required"):
        make_sampler(glyphs["train"], ways=None, shots=1, queries=1)
    with pytest.raises(ValueError, match="no ways"):
        make_sampler(load_dataset("sinusoid"), ways=5, shots=1, queries=1)


def test_dataset_to_device_keeps_episodes(glyphs):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    aug = Augment(crop_padding=2, flip=True, brightness=0.2)
    on_dev = EpisodeSampler(glyphs["train"].to(dev), 5, 2, 3, meta_batch=3, seed=0, augment=aug)
    on_cpu = EpisodeSampler(glyphs["train"], 5, 2, 3, meta_batch=3, seed=0, augment=aug)
    a, b = on_dev.sample(4), on_cpu.sample(4)
    assert a.support_x.device.type == dev and a.query_y.device.type == dev
    for x, y in zip(a.to("cpu"), b):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_affine_distortions_are_seeded_pure_and_exact_at_the_identity(glyphs):
    from bilevel.data import Affine, Compose, make_augmentation

    aug = make_augmentation("affine", 28)
    assert isinstance(aug, Affine) and aug.translation == pytest.approx(2 * 28 / 105)
    s = EpisodeSampler(glyphs["train"], 5, 2, 2, meta_batch=6, seed=0, augment=aug)
    full = s.sample(3)
    part = s.sample(3, indices=[4, 1])  # rank shares: the same episodes, augmentation included
    assert torch.equal(part.support_x, full.support_x[[4, 1]]) and torch.equal(part.query_x, full.query_x[[4, 1]])
    plain = EpisodeSampler(glyphs["train"], 5, 2, 2, meta_batch=6, seed=0).sample(3)
    assert torch.equal(full.support_y, plain.support_y)  # same classes and examples, distorted pixels
    assert not torch.equal(full.support_x, plain.support_x)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 28, 28)
    params = Affine(p=0.0).sample_params(4, g)  # every component off: the identity (up to float rounding)
    torch.testing.assert_close(Affine().apply(x, params), x, atol=1e-5, rtol=0)
    shift = {**params, "shift_x": torch.full((4,), 3.0, dtype=torch.float64)}
    torch.testing.assert_close(Affine().apply(x, shift)[..., 3:], x[..., :-3])  # 3 pixels to the right
    rot = {**params, "theta": torch.full((4,), math.pi / 2, dtype=torch.float64)}
    torch.testing.assert_close(Affine().apply(x, rot), torch.rot90(x, -1, dims=(-2, -1)), atol=1e-5, rtol=0)
    both = Compose((Affine(), make_augmentation("metaoptnet", 28)))
    assert set(both.sample_params(2, g)) >= {"0.theta", "1.crop"}
    with pytest.raises(ValueError, match="augment must be one of"):
        make_augmentation("elastic", 28)


def test_augment_option_at_the_cli(tmp_path):
    from click.testing import CliRunner

    from bilevel.cli import main

    r = CliRunner().invoke(main, ["maml", "train", "--dataset", "glyphs", "--ways", "3", "--shots", "1", "--queries", "2",
                                  "--meta-batch", "2", "--filters", "4", "--iterations", "2", "--val-every", "2",
                                  "--val-episodes", "2", "--test-episodes", "2", "--augment", "affine", "--no-progress",
                                  "--out", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["maml", "train", "--augment", "elastic", "--out", str(tmp_path / "s")])
    assert r.exit_code == 2 and "augment must be one of none, metaoptnet, affine" in r.output
