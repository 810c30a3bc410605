"""The shared training loop: outputs, exact resume after a kill, config files, CLI errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import bilevel
from bilevel.cli import main
from bilevel.train import DataConfig, TrainConfig, fit

REPO = Path(__file__).resolve().parents[1]
TINY_GLYPHS = ["--dataset", "glyphs", "--ways", "3", "--shots", "1", "--queries", "2", "--meta-batch", "2",
               "--filters", "8", "--val-episodes", "4", "--test-episodes", "6", "--threads", "1", "--no-progress",
               "--no-tensorboard"]


def _sin_fit(out: Path, iterations: int = 12, resume: bool = False, **kw) -> dict:
    cfg = dict(iterations=iterations, val_every=6, val_episodes=8, test_episodes=10, checkpoint_every=3,
               out=str(out), progress=False, tensorboard=False, seed=3)
    cfg.update(kw)
    return fit("maml", {"inner_lr": 0.01, "inner_steps": 2},
               DataConfig(dataset="sinusoid", shots=5, queries=5, meta_batch=3), TrainConfig(**cfg), resume=resume)


def test_fit_writes_model_metrics_logs_and_plot(tmp_path):
    metrics = _sin_fit(tmp_path)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["test"]["metric"] == "mse" and on_disk["test"]["episodes"] == 10
    assert on_disk["test"]["mean"] == pytest.approx(metrics["test"]["mean"])
    assert on_disk["test"]["ci95"] > 0 and on_disk["val"]["iteration"] in (6, 12)
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert rows[0].startswith("iteration,split,loss,metric")
    assert sum(",val," in r for r in rows) == 2
    assert (tmp_path / "curves.png").stat().st_size > 1000
    model = bilevel.load(tmp_path / "model.pt")
    x = torch.linspace(-5, 5, 10)[:, None]
    pred = model.predict(x[:5], torch.sin(x[:5]), x[5:])
    assert pred.shape == (5, 1) and torch.isfinite(pred).all()


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    full = tmp_path / "full"
    _sin_fit(full)
    part = tmp_path / "part"
    _sin_fit(part, iterations=6)  # "interrupted" after the checkpoint of iteration 6
    _sin_fit(part, iterations=12, resume=True)
    a = torch.load(full / "checkpoint.pt", weights_only=True)
    b = torch.load(part / "checkpoint.pt", weights_only=True)
    assert a["iteration"] == b["iteration"] == 12
    for k in a["learner"]:
        assert torch.equal(a["learner"][k], b["learner"][k]), k
    for k in ("state", "param_groups"):
        assert str(a["optimizer"][k]) == str(b["optimizer"][k])
    val_a = [r.split(",")[:5] for r in (full / "log.csv").read_text().splitlines() if ",val," in r]
    val_b = [r.split(",")[:5] for r in (part / "log.csv").read_text().splitlines() if ",val," in r]
    assert val_a == val_b and len(val_a) == 2


def test_resume_refuses_other_runs_and_missing_checkpoints(tmp_path):
    _sin_fit(tmp_path, iterations=3)
    with pytest.raises(ValueError, match="written by a different run"):
        _sin_fit(tmp_path, iterations=6, resume=True, seed=4)
    with pytest.raises(ValueError, match="already holds a run .*pass --resume"):
        _sin_fit(tmp_path, iterations=6)
    with pytest.raises(ValueError, match="no checkpoint"):
        _sin_fit(tmp_path / "empty", resume=True)


def _checkpoint_iteration(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["iteration"])
    except Exception:  # noqa: BLE001 - file not there yet
        return 0


def test_killed_cli_run_resumes_exactly(tmp_path):
    """SIGKILL a real `bilevel maml train` process after a checkpoint, resume, compare parameters."""
    args = ["maml", "train", *TINY_GLYPHS, "--iterations", "40", "--checkpoint-every", "4", "--val-every", "20",
            "--inner-lr", "0.4"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "bilevel.cli", *args]
    ref = tmp_path / "ref"
    subprocess.run([*cmd, "--out", str(ref)], check=True, env=env, capture_output=True)

    run = tmp_path / "run"
    proc = subprocess.Popen([*cmd, "--out", str(run)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _checkpoint_iteration(run / "checkpoint.pt") < 8 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    killed_at = _checkpoint_iteration(run / "checkpoint.pt")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 8 <= killed_at < 40, f"the run was not interrupted mid-way (checkpoint at {killed_at})"
    assert not (run / "metrics.json").exists()
    subprocess.run([*cmd, "--out", str(run), "--resume"], check=True, env=env, capture_output=True)
    a = torch.load(ref / "checkpoint.pt", weights_only=True)["learner"]
    b = torch.load(run / "checkpoint.pt", weights_only=True)["learner"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((ref / "metrics.json").read_text())["test"] == json.loads((run / "metrics.json").read_text())["test"]
    # the log of the resumed run is the log of the uninterrupted one (rows past the checkpoint are dropped)
    log_a = [r.split(",")[:5] for r in (ref / "log.csv").read_text().splitlines()]
    log_b = [r.split(",")[:5] for r in (run / "log.csv").read_text().splitlines()]
    assert log_a == log_b


def test_cli_train_eval_and_plot(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["maml", "train", *TINY_GLYPHS, "--iterations", "3", "--val-every", "3",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "test accuracy:" in r.output
    r = CliRunner().invoke(main, ["maml", "eval", "--checkpoint", str(out / "model.pt"), "--dataset", "glyphs",
                                  "--ways", "3", "--shots", "1", "--queries", "2", "--episodes", "6", "--eval-steps", "3",
                                  "--no-progress", "--out", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["test"]["episodes"] == 6
    (out / "curves.png").unlink()
    r = CliRunner().invoke(main, ["plot", str(out)])
    assert r.exit_code == 0 and (out / "curves.png").exists()


@pytest.mark.parametrize("suffix,text", [(".yaml", "iterations: 2\nways: 3\nqueries: 2\n"),
                                          (".toml", "iterations = 2\nways = 3\nqueries = 2\n")])
def test_config_file_gives_defaults_and_flags_override(tmp_path, suffix, text):
    cfg = tmp_path / f"c{suffix}"
    cfg.write_text(text)
    out = tmp_path / "run"
    args = ["maml", "train", "--config", str(cfg), "--dataset", "glyphs", "--shots", "1", "--meta-batch", "2",
            "--filters", "8", "--val-episodes", "2", "--test-episodes", "2", "--no-progress", "--iterations", "3",
            "--out", str(out)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["iteration"] == 3  # the flag wins over the file
    assert ckpt["identity"]["data"]["ways"] == 3 and ckpt["identity"]["data"]["queries"] == 2  # from the file


@pytest.mark.parametrize(
    "args,message",
    [
        (["--ways", "0"], "Invalid value for '--ways'"),
        (["--hypergrad", "sideways"], "unknown hypergradient 'sideways'"),
        (["--inner-lr", "-1"], "inner_lr must be in (0, inf], got -1.0"),
        (["--ways", "400"], "has only 320 classes"),
        (["--dataset", "omniglot", "--data-root", "/nonexistent/data"], "data root /nonexistent/data does not exist"),
        (["--dataset", "omniglot", "--data-root", "EMPTY"], "images_background"),
        (["--dataset", "nope"], "unknown dataset 'nope'"),
        (["--hypergrad", "implicit-cg:5"], "gives the initialisation θ no meta-gradient"),
        (["--lr-schedule", "abc"], "lr_schedule must be ITER:FACTOR"),
        (["--lr-schedule", "50:-1"], "factors must be finite numbers > 0"),
        (["--config", "/nonexistent.yaml"], "does not exist"),
    ],
)
def test_bad_cli_options_are_usage_errors(tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    args = [str(tmp_path / "empty") if a == "EMPTY" else a for a in args]
    r = CliRunner().invoke(main, ["maml", "train", "--out", str(tmp_path / "o"), "--no-progress", "--iterations", "1", *args])
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert "Traceback" not in r.output


def test_unknown_config_keys_are_refused(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("iterations: 2\nwayz: 3\n")
    r = CliRunner().invoke(main, ["maml", "train", "--config", str(cfg), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "unknown option(s) ['wayz']" in r.output


def test_meta_batch_not_divisible_by_ranks_is_explained():
    from bilevel.train import _share

    assert _share(8, 1, 2) == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="meta_batch=6 is not divisible by the number of processes \\(4\\)"):
        _share(6, 0, 4)


def test_evaluation_episodes_do_not_depend_on_the_meta_batch():
    from bilevel.train import build_samplers, evaluate_learner
    from learners.maml import MAML

    torch.manual_seed(0)
    learner = MAML(example_shape=[1], ways=None, inner_lr=0.01)
    results = []
    for meta_batch, chunk in ((2, 3), (7, 8)):
        s = build_samplers(DataConfig(dataset="sinusoid", shots=5, queries=5, meta_batch=meta_batch), seed=1, splits=("test",))
        results.append(evaluate_learner(learner, s.test, 10, chunk=chunk))
    assert results[0] == results[1] and results[0]["episodes"] == 10


def test_fit_logs_implicit_residuals_and_warns_once(tmp_path):
    """An unconverged implicit hypergradient: one warning for the run, the residuals of every logged row in log.csv."""
    import csv
    import warnings

    from bilevel.hypergrad import InexactHypergradientWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit("hyper-repr", {"hypergrad": "implicit-cg:20", "l2": 0.5, "inner_steps": 20, "filters": 4},
            DataConfig(dataset="glyphs", ways=3, shots=1, queries=2, meta_batch=2),
            TrainConfig(iterations=20, val_every=20, val_episodes=2, test_episodes=2, out=str(tmp_path), progress=False,
                        tensorboard=False))
    inexact = [w for w in caught if issubclass(w.category, InexactHypergradientWarning)]
    assert len(inexact) == 1 and "shown once per run" in str(inexact[0].message)
    assert len(caught) == len({(w.category, str(w.message)[:40]) for w in caught})  # every kind once
    rows = [r for r in csv.DictReader(open(tmp_path / "log.csv")) if r["split"] == "train"]
    assert len(rows) == 2 and all(0.001 < float(r["optimality"]) < 1 for r in rows)
    assert all(0 <= float(r["linear_residual"]) < 1 for r in rows)
    plain = [r for r in csv.DictReader(open(tmp_path / "log.csv")) if r["split"] == "val"]
    assert all(r["optimality"] == "" for r in plain)
