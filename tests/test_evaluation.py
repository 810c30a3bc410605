"""mean +- 95% CI over episodes, and the evaluation loop."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bilevel.data import EpisodeSampler, load_dataset
from bilevel.evaluation import episode_metric, evaluate, mean_ci


def test_mean_ci_formula():
    v = [0.5, 0.7, 0.9, 0.6]
    mean, ci = mean_ci(v)
    assert mean == pytest.approx(0.675)
    assert ci == pytest.approx(1.96 * np.std(v) / math.sqrt(4))  # population std, as MetaOptNet
    assert ci == pytest.approx(0.144944, abs=1e-6)  # 1.96 * 0.147902 / 2
    assert mean_ci(torch.ones(600)) == (1.0, 0.0)
    m1, c1 = mean_ci([0.3])
    assert m1 == 0.3 and math.isnan(c1)
    with pytest.raises(ValueError, match="at least one"):
        mean_ci([])
    with pytest.raises(ValueError, match=r"non-finite values at positions \[1\]"):
        mean_ci([0.1, float("nan")])


def test_episode_metric():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert episode_metric(logits, torch.tensor([0, 1, 1]), "accuracy") == pytest.approx(2 / 3)
    assert episode_metric(torch.ones(3, 1), torch.zeros(3, 1), "mse") == 1.0
    with pytest.raises(ValueError, match="metric must be"):
        episode_metric(logits, torch.tensor([0, 1, 1]), "f1")
    with pytest.raises(ValueError, match="mse needs"):
        episode_metric(torch.ones(3), torch.zeros(3, 1), "mse")


def test_evaluate_is_reproducible_and_position_independent():
    ds = load_dataset("glyphs", split="val", classes={"val": 6}, examples_per_class=6)
    s = EpisodeSampler(ds, ways=3, shots=1, queries=2, meta_batch=4, seed=0)
    seen = []

    def oracle(sx, sy, qx):  # nearest neighbour in pixel space
        seen.append(qx.shape)
        d = torch.cdist(qx.flatten(1), sx.flatten(1))
        return torch.nn.functional.one_hot(sy[d.argmin(1)], 3).float()

    r1 = evaluate(oracle, s, episodes=10)
    s.next(), s.next()  # the sampler position does not matter
    r2 = evaluate(oracle, s, episodes=10)
    assert r1 == r2 and len(seen) == 20 and seen[0] == (6, 1, 28, 28)
    assert r1["metric"] == "accuracy" and r1["episodes"] == 10 and len(r1["values"]) == 10
    assert (r1["mean"], r1["ci95"]) == mean_ci(r1["values"])
    assert 0.5 < r1["mean"] <= 1.0  # far above chance (1/3)
    r3 = evaluate(oracle, s, episodes=10, start=5)
    assert r3["values"] != r1["values"]
    with pytest.raises(ValueError, match="episodes must be an integer >= 1"):
        evaluate(oracle, s, episodes=0)


def _diverging_maml():
    """MAML on the sinusoid with a step size some tasks cannot take for 10 steps (their inner loss overflows)."""
    from learners.maml import MAML

    torch.manual_seed(0)
    return MAML(example_shape=[1], ways=None, inner_lr=0.2, eval_steps=10)


def test_diverged_episodes_are_recorded_not_fatal():
    from bilevel.evaluation import evaluate_learner, summarize
    from bilevel.run_config import DataConfig, build_samplers

    s = build_samplers(DataConfig(dataset="sinusoid", shots=5, queries=5, meta_batch=2), seed=0, splits=("test",))
    m = _diverging_maml()
    chunked = evaluate_learner(m, s.test, 40, chunk=8)  # tasks batched: one exploding task poisons its chunk
    single = evaluate_learner(m, s.test, 40, chunk=1)
    assert chunked["episodes"] == 40 and 0 < chunked["diverged"] < 40, chunked
    assert chunked["diverged"] == single["diverged"]
    assert chunked["median"] == pytest.approx(single["median"], rel=1e-5)
    assert math.isfinite(chunked["mean"]) and math.isfinite(chunked["ci95"])
    rec = summarize([1.0, float("nan"), 3.0, float("inf")], "mse")
    assert rec == {"metric": "mse", "mean": 2.0, "ci95": pytest.approx(1.96 / math.sqrt(2)), "median": 2.0, "episodes": 4, "diverged": 2}
    assert math.isnan(summarize([float("nan")], "accuracy")["mean"])


def test_eval_cli_reports_diverged_episodes_and_takes_eval_time_options(tmp_path):
    import json

    from click.testing import CliRunner

    from bilevel.cli import main

    out = tmp_path / "run"
    args = ["maml", "train", "--dataset", "sinusoid", "--shots", "5", "--queries", "5", "--meta-batch", "2",
            "--iterations", "2", "--val-every", "2", "--val-episodes", "2", "--test-episodes", "4", "--inner-lr", "0.01",
            "--no-progress", "--no-tensorboard", "--out", str(out)]
    assert CliRunner().invoke(main, args).exit_code == 0
    r = CliRunner().invoke(main, ["maml", "eval", "--checkpoint", str(out), "--episodes", "40", "--eval-steps", "10",
                                  "--inner-lr", "0.2", "--threads", "1", "--no-progress", "--out", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output
    ev = json.loads((tmp_path / "ev" / "eval.json").read_text())["test"]
    assert ev["diverged"] > 0 and f"{ev['diverged']} diverged, excluded; median" in r.output
    r = CliRunner().invoke(main, ["meta-sgd", "eval", "--checkpoint", str(out), "--inner-lr", "0.2"])
    assert r.exit_code == 2 and "No such option '--inner-lr'" in r.output  # Meta-SGD's step sizes are learned
