"""A learner defined in this test module gets `bilevel toy train|eval`, checkpoints, resume and bilevel.load
without any project file changing; declared options are validated the same way from Python, flags and files."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from click.testing import CliRunner
from torch import Tensor, nn

import bilevel
from bilevel.cli import main
from bilevel.learner import LearnerConfig, MetaLearner, n_way_of
from bilevel.options import OptionError, option
from bilevel.registry import UnknownLearnerError, get_learner, learner_names, name_of, unregister_learner

TINY = ["--dataset", "glyphs", "--ways", "3", "--shots", "1", "--queries", "2", "--meta-batch", "2", "--val-every", "2",
        "--val-episodes", "2", "--test-episodes", "4", "--checkpoint-every", "2", "--no-progress", "--no-tensorboard"]


@dataclass(frozen=True)
class ToyConfig(LearnerConfig):
    """Options of the toy learner."""

    width: int = option(8, help="Embedding width.", min=1)
    temperature: float = option(1.0, help="Logit scale at test time.", min=0, min_open=True, eval=True)


class ToyProto(MetaLearner):
    """Toy prototypes (test only): nearest class mean of a linear embedding."""

    Config = ToyConfig

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        d = 1
        for s in self.example_shape:
            d *= s
        self.embed = nn.Linear(d, self.config.width)

    def forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *, train: bool = True) -> Tensor:
        n = n_way_of(support_y)
        zs, zq = self.embed(support_x.flatten(2)), self.embed(query_x.flatten(2))
        onehot = torch.nn.functional.one_hot(support_y, n).to(zs.dtype)
        protos = onehot.mT @ zs / onehot.sum(1)[:, :, None]
        scale = 1.0 if train else self.config.temperature
        return -scale * torch.cdist(zq, protos) ** 2


@pytest.fixture
def toy():
    bilevel.register_learner("toy", ToyProto)
    yield "toy"
    unregister_learner("toy")


def test_a_registered_learner_trains_checkpoints_resumes_loads_and_evaluates_from_the_cli(toy, tmp_path):
    assert "toy" in learner_names() and name_of(ToyProto) == "toy"
    runner = CliRunner()
    help_text = runner.invoke(main, ["toy", "train", "--help"]).output
    assert "--width" in help_text and "Embedding width." in help_text
    out = tmp_path / "run"
    r = runner.invoke(main, ["toy", "train", *TINY, "--iterations", "4", "--width", "5", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "test accuracy:" in r.output
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["iteration"] == 4 and ckpt["identity"]["learner"] == "toy" and ckpt["identity"]["options"]["width"] == 5
    # resume to 6 iterations == 6 iterations in one go
    r = runner.invoke(main, ["toy", "train", *TINY, "--iterations", "6", "--width", "5", "--out", str(out), "--resume"])
    assert r.exit_code == 0, r.output
    ref = tmp_path / "ref"
    assert runner.invoke(main, ["toy", "train", *TINY, "--iterations", "6", "--width", "5", "--out", str(ref)]).exit_code == 0
    a = torch.load(out / "model.pt", weights_only=True)["state"]
    b = torch.load(ref / "model.pt", weights_only=True)["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # load and predict
    model = bilevel.load(out / "model.pt")
    assert model.name == "toy" and isinstance(model.learner, ToyProto) and model.learner.config.width == 5
    x = torch.rand(5, 1, 28, 28)
    assert model.predict(x[:3], torch.tensor([0, 1, 2]), x[3:]).shape == (2, 3)
    # eval with an eval-time option, on the model's own data settings
    r = runner.invoke(main, ["toy", "eval", "--checkpoint", str(out), "--episodes", "4", "--temperature", "2",
                             "--no-progress"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("glyphs test accuracy:") and "(4 episodes)" in r.output
    # the training-only option is not an eval option
    r = runner.invoke(main, ["toy", "eval", "--checkpoint", str(out), "--width", "3"])
    assert r.exit_code == 2 and "No such option '--width'" in r.output


def test_unregistered_names_and_bad_options_are_clear(toy, tmp_path):
    with pytest.raises(UnknownLearnerError, match="no learner is registered as 'nope'.*register_learner"):
        get_learner("nope")
    with pytest.raises(OptionError, match=r"width must be in \[1, inf\], got 0"):
        ToyProto(example_shape=[1, 4, 4], ways=3, width=0)
    with pytest.raises(OptionError, match="ToyProto has no option 'widht'"):
        ToyProto(example_shape=[1, 4, 4], ways=3, widht=3)
    with pytest.raises(OptionError, match="ways must be an integer >= 2"):
        ToyProto(example_shape=[1, 4, 4], ways=1)
    with pytest.raises(ValueError, match="already registered"):
        bilevel.register_learner("toy", MetaLearner)
    with pytest.raises(ValueError, match="lower-case letters"):
        bilevel.register_learner("Toy Learner", ToyProto)


@pytest.mark.parametrize(("flag", "yaml_text", "message"), [
    (["--width", "5.7"], "width: 5.7\n", "width must be an integer, got"),
    (["--width", "0"], "width: 0\n", "width must be in [1, inf], got 0"),
    (["--temperature", "inf"], "temperature: .inf\n", "temperature must be a finite number"),
    (["--temperature", "nan"], "temperature: .nan\n", "temperature must be a finite number"),
    (["--shots", "2.5"], "shots: 2.5\n", "shots must be an integer"),
    (["--ways", "1"], "ways: 1\n", "ways must be in [2, inf], got 1"),
    (["--lr-schedule", "50:-1"], "lr_schedule: [[50, -1]]\n", "factors must be finite numbers > 0"),
    (["--outer-lr", "inf"], "outer_lr: .inf\n", "outer_lr must be a finite number"),
])
def test_flags_and_config_files_are_validated_identically(toy, tmp_path, flag, yaml_text, message):
    base = ["toy", "train", "--no-progress", "--iterations", "1", "--out", str(tmp_path / "o")]
    r = CliRunner().invoke(main, [*base, *flag])
    assert r.exit_code == 2 and message in r.output, r.output
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    r = CliRunner().invoke(main, [*base, "--config", str(cfg)])
    assert r.exit_code == 2 and message in r.output, r.output
    assert not (tmp_path / "o").exists()


def test_config_yaml_of_a_run_repeats_it(tmp_path):
    runner = CliRunner()
    first = tmp_path / "first"
    r = runner.invoke(main, ["maml", "train", *TINY, "--iterations", "3", "--filters", "4", "--inner-lr", "0.3",
                             "--hypergrad", "truncated:1", "--out", str(first)])
    assert r.exit_code == 0, r.output
    text = (first / "config.yaml").read_text()
    assert "method: maml" in text and "hypergrad: truncated:1" in text and "--inner-lr 0.3" in text and "torch:" in text
    again = tmp_path / "again"
    r = runner.invoke(main, ["maml", "train", "--config", str(first / "config.yaml"), "--out", str(again)])
    assert r.exit_code == 0, r.output
    a = torch.load(first / "model.pt", weights_only=True)
    b = torch.load(again / "model.pt", weights_only=True)
    assert a["config"] == b["config"] and all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    r = runner.invoke(main, ["meta-sgd", "train", "--config", str(first / "config.yaml"), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "configuration of a 'maml' run" in r.output


def test_the_whole_strategy_vocabulary_reaches_the_learners(tmp_path):
    from bilevel.hypergrad import from_string

    for text in ("reverse", "first-order", "truncated:2", "checkpointed:2", "forward"):
        out = tmp_path / text.replace(":", "-")
        r = CliRunner().invoke(main, ["maml", "train", "--dataset", "sinusoid", "--shots", "2", "--queries", "2",
                                      "--meta-batch", "2", "--iterations", "2", "--val-every", "2", "--val-episodes", "2",
                                      "--test-episodes", "2", "--inner-steps", "2", "--hypergrad", text, "--no-progress",
                                      "--no-tensorboard", "--out", str(out)])
        assert r.exit_code == 0, (text, r.output)
        model = bilevel.load(out / "model.pt")
        assert model.learner.config.hypergrad == from_string(text)
        assert json.loads(json.dumps(model.learner.to_json()))["options"]["hypergrad"] == text


def test_eval_reads_the_data_settings_from_the_model_file(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["maml", "train", "--dataset", "sinusoid", "--shots", "3", "--queries", "4",
                                  "--meta-batch", "2", "--iterations", "2", "--val-every", "2", "--val-episodes", "2",
                                  "--test-episodes", "3", "--inner-lr", "0.01", "--no-progress", "--out", str(out)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["maml", "eval", "--checkpoint", str(out / "model.pt"), "--episodes", "3",
                                  "--no-progress", "--out", str(tmp_path / "ev")])
    assert r.exit_code == 0 and r.output.startswith("sinusoid test mse:"), r.output
    ev = json.loads((tmp_path / "ev" / "eval.json").read_text())["test"]
    assert ev["data"]["shots"] == 3 and ev["data"]["queries"] == 4 and ev["learner"] == "maml"
    # the same episodes as the training run's own test (same seed, same settings)
    metrics = json.loads((out / "metrics.json").read_text())["test"]
    assert ev["mean"] == pytest.approx(metrics["mean"], rel=1e-12)
    r = CliRunner().invoke(main, ["metaoptnet", "eval", "--checkpoint", str(out / "model.pt"), "--episodes", "3"])
    assert r.exit_code == 2 and "holds a 'maml' model, not 'metaoptnet'" in r.output


def test_options_round_trip_through_json_for_every_builtin_learner():
    from bilevel import options as opts

    for name in ("maml", "meta-sgd", "meta-curvature", "meta-lstm", "hyper-repr", "metaoptnet", "imaml", "anil", "reptile"):
        cls = get_learner(name).factory
        config = cls.Config()
        assert opts.from_json(cls.Config, json.loads(json.dumps(opts.to_json(config)))) == config, name
        assert cls.summary() and "(" in cls.summary(), name  # "Method (Authors year): …"
