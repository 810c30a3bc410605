"""The few-shot recipe files in examples/configs: every key is a declared option of the method they
name, and each trains from one command (``bilevel <method> train --config FILE --out NEW``)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from bilevel import options as opts
from bilevel.cli import main
from bilevel.registry import get_learner
from bilevel.run_config import DataConfig, TrainConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "examples" / "configs").glob("*.yaml"))


def _recipe(path: Path) -> tuple[str, dict]:
    data = yaml.safe_load(path.read_text())
    assert set(data) == {"method", "options"}, f"{path.name}: a recipe is `method:` and `options:`"
    return data["method"], data["options"]


def test_there_are_recipes() -> None:
    assert len(CONFIGS) >= 4, [p.name for p in CONFIGS]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_recipe_keys_are_declared_options(path: Path) -> None:
    method, values = _recipe(path)
    learner = get_learner(method).factory
    parts = {}
    for cls in (DataConfig, TrainConfig, learner.Config):
        names = {f.name for f, _d, _a in opts.declared(cls)}
        parts[cls] = {k: v for k, v in values.items() if k in names}
    assert set(values) == set().union(*map(set, parts.values())), "keys that no config declares"
    data = opts.from_text(DataConfig, parts[DataConfig], where=path.name)
    opts.from_text(TrainConfig, parts[TrainConfig], where=path.name)
    opts.from_text(learner.Config, parts[learner.Config], where=path.name)
    # the transfer protocol: 20-way 1-shot, tested within-alphabet on held-out alphabets
    assert (data.dataset, data.ways, data.shots, data.split_by) == ("omniglot", 20, 1, "alphabet")
    assert data.holdout is not None and data.within_alphabet and data.data_root.endswith("shared/data")


@pytest.mark.integration
@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_recipe_trains_from_one_command(path: Path, shared_data_root: Path, tmp_path: Path) -> None:
    if not (shared_data_root / "omniglot" / "images_background_small1.zip").is_file():
        pytest.skip(f"reduced Omniglot sets not found in {shared_data_root / 'omniglot'}")
    method, values = _recipe(path)
    out = tmp_path / "run"
    r = CliRunner().invoke(main, [method, "train", "--config", str(path), "--data-root", str(shared_data_root),
                                  "--iterations", "1", "--val-every", "1", "--val-episodes", "1", "--test-episodes",
                                  "1", "--no-progress", "--no-tensorboard", "--out", str(out)])
    assert r.exit_code == 0, r.output
    written = yaml.safe_load((out / "config.yaml").read_text())["options"]
    overridden = {"iterations", "val_every", "val_episodes", "test_episodes", "progress", "tensorboard", "data_root"}
    assert {k: v for k, v in values.items() if k not in overridden} == {
        k: written[k] for k in values if k not in overridden}
    assert dataclasses.is_dataclass(get_learner(method).factory.Config)
