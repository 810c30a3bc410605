"""A short ``bilevel <method> train`` run of each learner: model.pt, metrics.json, load + predict."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import bilevel
from bilevel.cli import main
from bilevel.train import DataConfig, build_samplers

TINY = ["--ways", "3", "--shots", "1", "--queries", "2", "--meta-batch", "2", "--iterations", "3", "--val-every", "3",
        "--val-episodes", "2", "--test-episodes", "4", "--no-progress"]

RUNS = [
    ("meta-sgd", "glyphs", ["--filters", "8"]),
    ("meta-curvature", "glyphs", ["--filters", "8"]),
    ("meta-lstm", "glyphs", ["--filters", "8", "--hidden-size", "4", "--inner-steps", "2"]),
    ("hyper-repr", "glyphs", ["--filters", "8"]),
    ("meta-sgd", "sinusoid", ["--inner-lr", "0.01", "--hypergrad", "first-order"]),
    ("meta-curvature", "sinusoid", ["--inner-lr", "0.01"]),
    ("meta-lstm", "sinusoid", ["--hypergrad", "reverse"]),
    ("hyper-repr", "sinusoid", ["--variant", "classic"]),
]


def _one_episode(dataset: str) -> bilevel.data.sampler.Episodes:
    samplers = build_samplers(DataConfig(dataset=dataset, ways=3, shots=1, queries=2, meta_batch=1), seed=5, splits=("test",))
    return samplers.test.sample(0).episode(0)


@pytest.mark.parametrize(("method", "dataset", "extra"), RUNS, ids=[f"{m}-{d}" for m, d, _ in RUNS])
def test_train_writes_model_and_metrics(tmp_path: Path, method: str, dataset: str, extra: list[str]) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(main, [method, "train", "--dataset", dataset, *TINY, *extra, "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["episodes"] == 4 and metrics["iterations"] == 3
    assert metrics["test"]["metric"] == ("mse" if dataset == "sinusoid" else "accuracy")
    assert torch.isfinite(torch.tensor(metrics["test"]["mean"]))
    model = bilevel.load(out / "model.pt")
    ep = _one_episode(dataset)
    pred = model.predict(ep.support_x, ep.support_y, ep.query_x)
    assert pred.shape == ((ep.query_x.shape[0], 3) if dataset == "glyphs" else (ep.query_x.shape[0], 1))
    assert bool(torch.isfinite(pred).all())
    again = model.learner.predict_episode(ep.support_x, ep.support_y, ep.query_x, 3 if dataset == "glyphs" else None)
    torch.testing.assert_close(pred, again, rtol=0, atol=0)


def test_eval_of_a_trained_hyper_repr_with_more_steps(tmp_path: Path) -> None:
    out = tmp_path / "run"
    runner = CliRunner()
    assert runner.invoke(main, ["hyper-repr", "train", "--dataset", "glyphs", *TINY, "--filters", "8", "--inner-steps", "2",
                                "--hypergrad", "forward", "--out", str(out)]).exit_code == 0
    result = runner.invoke(main, ["hyper-repr", "eval", "--dataset", "glyphs", "--ways", "3", "--shots", "1", "--queries", "2",
                                  "--checkpoint", str(out / "model.pt"), "--episodes", "4", "--eval-steps", "7", "--no-progress",
                                  "--out", str(out / "eval")])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "eval" / "eval.json").read_text())["test"]["episodes"] == 4


def test_bad_variant_combination_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["hyper-repr", "train", *TINY, "--variant", "approx", "--hypergrad", "reverse",
                                       "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "fixes the hypergradient to no-inner" in result.output
    assert not (tmp_path / "run").exists()
