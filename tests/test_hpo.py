"""bilevel.hpo and `bilevel hpo`: small end-to-end runs, hyperparameters moving the right way, bad input.

Every task runs on scikit-learn's digits (offline) with a handful of hyper-steps; the real-MNIST
checks use the ``shared_data_root`` fixture (the README-sized run is marked slow).
"""
from __future__ import annotations

import csv
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import bilevel as bl
from bilevel import hpo
from bilevel import options as opts
from bilevel.cli import main
from bilevel.hypergrad import InexactHypergradientWarning
from bilevel.hpo.lr import heavy_ball

SMALL = dict(n_train=200, n_val=200, n_test=200, progress=False)


@pytest.fixture(autouse=True)
def _one_thread():
    """These problems are tiny: intra-op threads only add contention on a shared CI machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------- tasks
def test_clean_downweights_corrupted_examples(tmp_path):
    m = hpo.run(hpo.CleanConfig(**SMALL, hyper_steps=15, out=tmp_path))
    assert m["n_corrupted"] == 100 and m["n_hparams"] == 200
    # the hyperparameters moved the right way: corrupted examples get small weights, clean ones large
    assert m["mean_weight_corrupted"] < 0.3 < 0.7 < m["mean_weight_clean"]
    assert m["f1"] > 0.8
    # the references bracket the tuned model: baseline (all examples) is clearly worse than the oracle
    assert m["baseline_accuracy"] + 0.05 < m["oracle_accuracy"]
    assert m["test_accuracy"] > m["baseline_accuracy"] + 0.05
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert {"test_accuracy", "baseline_accuracy", "oracle_accuracy", "f1"} <= set(saved)
    assert saved["f1"] == pytest.approx(m["f1"])
    rows = _csv_rows(tmp_path / "log.csv")
    assert len(rows) == 15 and list(rows[0])[:2] == ["step", "val_loss"]
    assert float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"]) - 0.2
    for png in ("weights_hist.png", "history.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_clean_projection_and_reverse(tmp_path):
    m = hpo.run(hpo.CleanConfig(**SMALL, hyper_steps=8, eval_steps=100, weights="projection", hypergrad=bl.Reverse(),
                                inner_steps=40))
    assert m["mean_weight_corrupted"] < m["mean_weight_clean"] - 0.1
    assert m["hypergrad"] == "reverse" and m["config"]["hypergrad"] == "reverse"


def test_clean_without_corruption_has_no_f1_reference(tmp_path):
    m = hpo.run(hpo.CleanConfig(**SMALL, hyper_steps=2, eval_steps=200, corrupt_fraction=0.0, out=tmp_path))
    assert m["n_corrupted"] == 0 and m["gap_closed"] is None and "mean_weight_corrupted" not in m
    assert m["baseline_accuracy"] == m["oracle_accuracy"]


@pytest.mark.parametrize("hypergrad, text", [(None, "implicit-cg:300:0.001:tol=0.01:warm-start"), (bl.Reverse(), "reverse")])
def test_l2_per_feature_beats_the_grid(tmp_path, hypergrad, text):
    out = tmp_path / text
    m = hpo.run(hpo.L2Config(n_train=100, n_val=300, n_test=300, progress=False, hyper_steps=12, grid_points=5,
                             grid_min=-4, grid_max=0, eval_steps=120, hypergrad=hypergrad, out=out))
    assert m["n_hparams"] == 64 and m["hypergrad"] == text
    # implicit: warm-started, 30 inner steps at a time (until certified); unrolled: the whole 120-step refit from w_0 = 0
    assert m["config"]["inner_steps"] == (30 if text.startswith("implicit") else 120)
    assert [g["l2"] for g in m["grid"]] == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    assert m["grid_val_loss"] == min(g["val_loss"] for g in m["grid"])
    # the tuned per-feature L2 lowers the validation loss below the best shared L2 (same refit)
    assert m["tuned_val_loss"] < m["grid_val_loss"] - 0.02
    assert m["tuned_log10_l2"]["max"] - m["tuned_log10_l2"]["min"] > 0.5  # the features went their own ways
    assert (out / "l2.png").is_file() and len(_csv_rows(out / "log.csv")) == 12


def test_l2_per_weight_entry():
    m = hpo.run(hpo.L2Config(n_train=100, n_val=200, n_test=100, progress=False, hyper_steps=3, grid_points=2, grid_min=-4,
                             eval_steps=100, per="weight"))
    assert m["n_hparams"] == 640


def test_lr_forward_and_reverse_agree_and_improve(tmp_path):
    common = dict(**SMALL, hyper_steps=6, inner_steps=15, hyper_lr=0.2, batch_size=50)
    fwd = hpo.run(hpo.LRConfig(**common, out=tmp_path))  # forward mode is the default
    rev = hpo.run(hpo.LRConfig(**common, hypergrad=bl.Reverse()))
    assert (fwd["hypergrad"], rev["hypergrad"]) == ("forward", "reverse")
    # two independent mechanisms (jvp forward mode, back-propagation) walk the same hyper-path
    assert fwd["tuned_lr"] == pytest.approx(rev["tuned_lr"], rel=1e-4)
    assert fwd["tuned_momentum"] == pytest.approx(rev["tuned_momentum"], rel=1e-4)
    # too small a learning rate at the start: the hypergradient raises η and μ, and the losses drop
    assert fwd["tuned_lr"] > 2 * fwd["initial_lr"] and fwd["tuned_momentum"] > fwd["initial_momentum"]
    assert fwd["tuned_val_loss"] < fwd["initial_val_loss"] - 0.2
    assert fwd["tuned_train_loss"] < fwd["initial_train_loss"] - 0.2
    rows = _csv_rows(tmp_path / "log.csv")
    assert [r["step"] for r in rows] == ["1", "2", "3", "4", "5", "6"]
    assert float(rows[0]["lr"]) == pytest.approx(0.01)
    assert (tmp_path / "lr.png").is_file() and "initial" in json.loads((tmp_path / "metrics.json").read_text())


@pytest.mark.parametrize("hypergrad", [bl.Forward(), bl.Truncated(2)])
def test_lr_online_updates_within_one_run(hypergrad):
    m = hpo.run(hpo.LRConfig(**SMALL, hyper_steps=8, inner_steps=10, online=True, hypergrad=hypergrad, hyper_lr=0.2))
    assert m["mode"] == "online" and m["eval_steps"] == 80
    assert m["tuned_lr"] > m["initial_lr"]
    assert m["tuned_val_loss"] < m["initial_val_loss"]
    assert math.isfinite(m["online_run"]["val_loss"])


def test_lr_schedule(tmp_path):
    m = hpo.run(hpo.LRConfig(**SMALL, hyper_steps=4, inner_steps=10, schedule=True, hyper_lr=0.2, out=tmp_path))
    assert m["hypergrad"] == "reverse" and len(m["tuned_schedule"]) == 10  # reverse is the schedule's default
    assert min(m["tuned_schedule"]) > m["initial_lr"]
    assert m["tuned_val_loss"] < m["initial_val_loss"]
    assert (tmp_path / "schedule.png").is_file()


# ---------------------------------------------------------------------------------------- data
def test_load_digits_and_split(gen):
    x, y, k = hpo.load_dataset("digits")
    assert x.shape == (1797, 64) and x.dtype == torch.float32 and 0.0 <= float(x.min()) and float(x.max()) == 1.0
    assert k == 10 and y.dtype == torch.int64
    data = hpo.split_dataset(x, y, 100, 50, 25, generator=gen, num_classes=k)
    assert [len(s.y) for s in (data.train, data.val, data.test)] == [100, 50, 25]
    ids = hpo.split_dataset(torch.arange(1797.0)[:, None], y, 100, 50, 25, generator=gen)
    used = torch.cat([ids.train.x, ids.val.x, ids.test.x]).flatten()
    assert len(torch.unique(used)) == 175  # disjoint sets
    assert torch.equal(y[ids.val.x.flatten().long()], ids.val.y)  # labels follow their examples
    with pytest.raises(hpo.OptionError, match=r"the validation set is empty \(n_val=0\)"):
        hpo.split_dataset(x, y, 100, 0, 25, generator=gen)
    with pytest.raises(hpo.OptionError, match="but data has only 1797"):
        hpo.split_dataset(x, y, 1000, 800, 25, generator=gen)


def test_corrupt_labels_flips_exactly_the_fraction(gen):
    y = torch.arange(10).repeat(20)
    noisy, corrupted = hpo.corrupt_labels(y, 0.5, 10, generator=gen)
    assert int(corrupted.sum()) == 100
    assert bool((noisy[corrupted] != y[corrupted]).all()) and bool((noisy[~corrupted] == y[~corrupted]).all())
    assert int(noisy.min()) >= 0 and int(noisy.max()) <= 9
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(hpo.OptionError, match=r"corrupt fraction must be in \[0, 1\)") as e:
            hpo.corrupt_labels(y, bad, 10, generator=gen)
        assert e.value.option == "corrupt_fraction"


def test_minibatches_are_reproducible(gen):
    split = hpo.Split(torch.arange(50.0)[:, None], torch.arange(50))
    batch = hpo.minibatches(split, 8, 5, generator=gen)
    assert torch.equal(batch(3)[1], batch(3)[1]) and batch(1)[0].shape == (8, 1)
    with pytest.raises(ValueError, match=r"step 6, outside 1..5"):
        batch(6)
    whole = hpo.minibatches(split, 100, 2, generator=gen)
    assert whole(1)[0] is split.x


def test_missing_or_broken_mnist(tmp_path):
    with pytest.raises(hpo.OptionError, match="needs --data-root"):
        hpo.load_dataset("mnist")
    with pytest.raises(hpo.OptionError, match="does not exist"):
        hpo.load_dataset("mnist", tmp_path / "nowhere")
    with pytest.raises(hpo.OptionError, match=r"no MNIST under .*mnist10k.npz.*--download"):
        hpo.load_dataset("mnist", tmp_path)
    (tmp_path / "mnist10k.npz").write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match="cannot read it as an .npz archive"):
        hpo.load_dataset("mnist", tmp_path)
    np.savez(tmp_path / "mnist10k.npz", images=np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(ValueError, match=r"missing array\(s\) \['labels'\]"):
        hpo.load_dataset("mnist", tmp_path)
    np.savez(tmp_path / "mnist10k.npz", images=np.zeros((3, 28, 28), np.uint8), labels=np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match=r"'images' has shape \[3, 28, 28\] and 'labels' \[4\]"):
        hpo.load_dataset("mnist", tmp_path)
    with pytest.raises(hpo.OptionError, match="unknown dataset 'cifar'"):
        hpo.load_dataset("cifar")


def test_npz_path_and_pixel_scaling(tmp_path):
    images = np.full((5, 28, 28), 255, np.uint8)
    np.savez(tmp_path / "tiny.npz", images=images, labels=np.arange(5))
    x, y, k = hpo.load_dataset("mnist", tmp_path / "tiny.npz")
    assert x.shape == (5, 784) and float(x.max()) == 1.0 and y.tolist() == [0, 1, 2, 3, 4]


def test_real_mnist10k(shared_data_root):
    x, y, k = hpo.load_dataset("mnist", shared_data_root)
    assert x.shape == (10000, 784) and k == 10 and 0.0 <= float(x.min()) and float(x.max()) == 1.0
    assert sorted(torch.unique(y).tolist()) == list(range(10))


@pytest.mark.slow
def test_real_mnist_hyper_cleaning_closes_the_gap(shared_data_root, tmp_path):
    """The README's run: ≥ 80% of the baseline→oracle gap closed, F1 ≥ 0.85 (1-4 minutes)."""
    m = hpo.run(hpo.CleanConfig(data_root=shared_data_root, out=tmp_path, progress=False))
    assert m["gap_closed"] >= 0.8 and m["f1"] >= 0.85


# ---------------------------------------------------------------------------------- the loop
def test_hyper_loop_logs_and_stops_on_non_finite(tmp_path):
    rows, state = hpo.hyper_loop(lambda it, s: ({"val_loss": 1.0 / it, "lr": torch.tensor(0.5)}, s + [it]), [], 3,
                                 out=tmp_path, progress=False)
    assert [r["val_loss"] for r in rows] == [1.0, 0.5, pytest.approx(1 / 3)] and rows[0]["lr"] == 0.5
    assert state == [1, 2, 3]  # the state each step returned is the next step's input, and the last one comes back
    assert len(_csv_rows(tmp_path / "log.csv")) == 3
    with pytest.raises(ValueError, match=r"hyper-step 2: \['val_loss'\] not finite"):
        hpo.hyper_loop(lambda it, s: ({"val_loss": float("nan") if it == 2 else 1.0}, s), None, 3, out=tmp_path,
                       progress=False)
    assert len(_csv_rows(tmp_path / "log.csv")) == 1  # what was logged before the failure is on disk
    with pytest.raises(hpo.OptionError, match="hyper_steps must be an integer >= 1"):
        hpo.hyper_loop(lambda it, s: ({}, s), None, 0)


def test_apply_hypergradient_checks_its_input():
    h = {"a": torch.zeros(3, requires_grad=True), "fixed": torch.ones(2)}
    opt = torch.optim.SGD([h["a"]], lr=0.5)
    hpo.apply_hypergradient(opt, h, {"a": torch.tensor([1.0, 2.0, 3.0])})
    assert h["a"].tolist() == [-0.5, -1.0, -1.5]
    with pytest.raises(ValueError, match=r"no hypergradient for hparams\['a'\]"):
        hpo.apply_hypergradient(opt, h, {})
    with pytest.raises(ValueError, match=r"shape \[2\], expected \[3\]"):
        hpo.apply_hypergradient(opt, h, {"a": torch.zeros(2)})
    with pytest.raises(ValueError, match="not finite"):
        hpo.apply_hypergradient(opt, h, {"a": torch.tensor([0.0, float("inf"), 0.0])})


# ------------------------------------------------------- explicit state and honest certificates
#: Metrics of tiny runs recorded on main (3807791) before the hyper-loop's state became explicit, one thread:
#: the same seeds give the same numbers. The implicit runs use that loop's rule, one inner run of T steps per
#: hyper-step: a tol that no residual reaches keeps the certified loop from continuing (tol never changed the
#: numbers, only the warnings). Checked there with ==; compared here to 1e-5 so that another CPU's kernels pass.
#: The two implicit runs stop CG after 20 / 30 iterations, far from converged (that is what they record), and
#: an unconverged CG amplifies another CPU's float32 rounding over 4 hyper-steps: on the CI machine (2026-12-01)
#: they differed by 5.2e-5 (l2) and 1.45e-2 (clean: F1 counts one example differently). Their tolerance is
#: 3e-2, still tighter than what a different hypergradient does to them (reverse instead: 4% to 12% apart).
TOLERANCE = {"l2-implicit-cg:30": 3e-2, "clean-implicit-cg:20": 3e-2}
RECORDED = {
    "l2-implicit-cg:30": [0.49175894260406494, 0.4151397943496704, -3.1741809844970703, -2.8258016109466553],
    "l2-reverse": [0.5114949941635132, 0.4327278435230255, -3.1737241744995117, -2.8257806301116943],
    "clean-implicit-cg:20": [0.780952380952381, 0.5779788494110107, 0.36884161829948425, 1.4004051685333252],
    "clean-projection-reverse": [0.8723404255319149, 0.6710894107818604, 0.3701113760471344, 1.4276340007781982],
    "lr-forward": [0.022068919613957405, 0.6877419948577881, 2.3257904052734375],
    "lr-online-forward": [0.021740509197115898, 0.6814055442810059, 1.9057104587554932, 2.0391368865966797],
    "lr-online-truncated:2": [0.021993495523929596, 0.6873300075531006, 1.8922382593154907, 2.037701368331909],
}


def _recorded_run(name: str) -> list[float]:
    common = dict(n_train=100, n_val=200, n_test=200, progress=False, hyper_steps=4)
    one_chunk = {"l2-implicit-cg:30": bl.Implicit(bl.CG(maxiter=30), tol=10.0),
                 "clean-implicit-cg:20": bl.Implicit(bl.CG(maxiter=20), tol=10.0)}
    lr = dict(**common, inner_steps=8, batch_size=50, hyper_lr=0.2)
    task, options = {
        "l2-implicit-cg:30": ("l2", dict(**common, grid_points=3, eval_steps=80, hypergrad=one_chunk["l2-implicit-cg:30"])),
        "l2-reverse": ("l2", dict(**common, grid_points=3, eval_steps=40, hypergrad=bl.Reverse())),
        "clean-implicit-cg:20": ("clean", dict(**common, eval_steps=80, hypergrad=one_chunk["clean-implicit-cg:20"])),
        "clean-projection-reverse": ("clean", dict(**common, eval_steps=80, weights="projection", hypergrad=bl.Reverse(),
                                                   inner_steps=20)),
        "lr-forward": ("lr", lr),
        "lr-online-forward": ("lr", dict(**lr, online=True)),
        "lr-online-truncated:2": ("lr", dict(**lr, online=True, hypergrad=bl.Truncated(2))),
    }[name]
    m = hpo.run(hpo.make_config(task, **options))
    if task == "l2":
        return [m["tuned_val_loss"], m["tuned_test_loss"], m["tuned_log10_l2"]["min"], m["tuned_log10_l2"]["max"]]
    if task == "clean":
        return [m["f1"], m["mean_weight_clean"], m["mean_weight_corrupted"], m["tuned"]["val_loss"]]
    return [m["tuned_lr"], m["tuned_momentum"], m["tuned_val_loss"]] + ([m["online_run"]["val_loss"]] if "online_run" in m else [])


@pytest.mark.parametrize("name", list(RECORDED))
def test_explicit_state_gives_the_recorded_results(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error", InexactHypergradientWarning)
        got = _recorded_run(name)
    assert got == pytest.approx(RECORDED[name], rel=TOLERANCE.get(name, 1e-5), abs=1e-7)


def _floats(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows]


def test_l2_default_run_is_certified_silent_and_logs_its_residuals(tmp_path):
    """`bilevel hpo l2` at its defaults (digits, 50 hyper-steps): every hyper-step certified at tol = 1e-2, no warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", InexactHypergradientWarning)
        m = hpo.run(hpo.L2Config(out=tmp_path, progress=False))
    rows = _csv_rows(tmp_path / "log.csv")
    assert len(rows) == 50 and {"optimality", "linear_residual", "linear_iterations", "inner_steps"} <= set(rows[0])
    opt, lin, steps = _floats(rows, "optimality"), _floats(rows, "linear_residual"), _floats(rows, "inner_steps")
    assert all(math.isfinite(v) and 0.0 < v <= 1e-2 for v in opt + lin)
    # 30 steps at a time, continued until certified (the cold first run needs more), never past the refit's 300
    assert all(s % 30 == 0 and 30 <= s <= 300 for s in steps) and steps[0] > 30
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for name, values in (("optimality", opt), ("linear_residual", lin)):
        assert saved[f"{name}_max"] == m[f"{name}_max"] == pytest.approx(max(values), rel=1e-5)  # the CSV has 6 digits
        assert saved[f"{name}_last"] == pytest.approx(values[-1], rel=1e-5)


def test_cli_clean_default_run_is_silent_and_prints_the_residuals(tmp_path):
    """A default `bilevel hpo clean` (digits, 60 hyper-steps) printed ~60 warnings; certified at 1e-2 it prints none."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", InexactHypergradientWarning)
        result = CliRunner().invoke(main, ["hpo", "clean", "--out", str(tmp_path), "--no-progress", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "InexactHypergradient" not in result.output and "inexact" not in result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0.0 < metrics["optimality_max"] <= 1e-2 and 0.0 < metrics["linear_residual_max"] <= 1e-2
    assert f'"optimality_max": {metrics["optimality_max"]}' in result.output
    assert metrics["f1"] > 0.9 and metrics["gap_closed"] > 0.85  # the README's digits run: F1 0.937, 91% of the gap


def test_inexact_linear_solve_warns_with_the_logged_numbers(tmp_path):
    """implicit-cg:2 cannot reach tol = 1e-2: each hyper-step warns, its message holding the residual the log has."""
    config = hpo.L2Config(n_train=100, n_val=200, n_test=100, progress=False, hyper_steps=3, grid_points=2, eval_steps=60,
                          hypergrad=bl.hypergrad.from_string("implicit-cg:2:tol=0.01"), out=tmp_path)
    with pytest.warns(InexactHypergradientWarning) as caught:
        hpo.run(config)
    messages = [str(w.message) for w in caught if issubclass(w.category, InexactHypergradientWarning)]
    rows = _csv_rows(tmp_path / "log.csv")
    assert len(messages) == len(rows) == 3
    for row, message in zip(rows, messages):
        assert row["linear_iterations"] == "2" and float(row["linear_residual"]) > 1e-2
        said = re.search(r"Linear-solve residual ‖A u − b‖/‖b‖ = (\S+) \(ABOVE tol\) after 2 CG iterations", message)
        assert said is not None, message
        assert float(said.group(1)) == pytest.approx(float(row["linear_residual"]), rel=1e-3)
        assert "More CG iterations (CG(maxiter > 2))" in message


def test_inner_run_stops_at_the_refit_length_then_warns(tmp_path):
    """The certified loop runs at most eval_steps inner steps; if w_T is still not within tol, the warning says so."""
    config = hpo.CleanConfig(**SMALL, hyper_steps=2, inner_steps=5, eval_steps=10, out=tmp_path)
    with pytest.warns(InexactHypergradientWarning) as caught:
        m = hpo.run(config)
    messages = [str(w.message) for w in caught if issubclass(w.category, InexactHypergradientWarning)]
    assert len(messages) == 2 and messages[0].startswith("hyper-step 1, 10 inner steps in all, up to max_steps=10 (5 at a")
    assert all(re.search(r"Optimality residual .* \(ABOVE tol; .*Linear-solve residual .* \(ok\)", m_) for m_ in messages)
    rows = _csv_rows(tmp_path / "log.csv")
    assert [r["inner_steps"] for r in rows] == ["10", "10"] and min(_floats(rows, "optimality")) > 1e-2
    assert m["optimality_max"] > 1e-2 >= m["linear_residual_max"]


def test_hyper_step_carries_its_state_explicitly():
    """HyperStep holds constants only: w_0, the cold-start scale and the CG solution travel in the HyperState."""
    x, y, k = hpo.load_dataset("digits")
    model = hpo.logistic_regression(64, k)
    from bilevel.hpo.clean import weighted_loss

    problem = bl.BilevelProblem(weighted_loss(model, 1e-3), hpo.cross_entropy_loss(model))
    h = {"logit": torch.zeros(100, requires_grad=True)}
    step = hpo.HyperStep(problem, (x[:100], y[:100]), (x[100:200], y[100:200]), dynamics=bl.HeavyBall(lr=0.5, momentum=0.9),
                         steps=20, hypergrad=bl.hypergrad.from_string("implicit-cg:100:0.001:tol=0.01:warm-start"),
                         warm_start=True, max_steps=200)
    state = step.init(h, torch.optim.Adam([h["logit"]], lr=0.2), hpo.init_params(model, zeros=True))
    assert isinstance(state.inner, dict) and state.linsolve is None
    row, state1 = step(1, state)
    assert state1.hparams is h and state1.optimizer is state.optimizer  # λ moved in place by its optimizer
    assert isinstance(state1.inner, bl.InnerState) and state1.inner.t == 0  # restarted at w_T ...
    scale = state1.inner.optimality_scale
    assert scale is not None and scale > 0  # ... measured against the cold start
    assert set(state1.linsolve) == {"weight", "bias"}  # the CG solution, next solve's initial guess
    row2, state2 = step(2, state1)
    assert state2.inner.optimality_scale == scale and row2["optimality"] <= 1e-2 and row["optimality"] <= 1e-2
    # the same step from the same state gives the same row: nothing is hidden in the step object
    h_again = {"logit": torch.zeros(100, requires_grad=True)}
    again, _ = step(1, step.init(h_again, torch.optim.Adam([h_again["logit"]], lr=0.2), hpo.init_params(model, zeros=True)))
    assert again == row
    with pytest.raises(ValueError, match=r"max_steps=...\) continues the inner run until Implicit's"):
        hpo.HyperStep(problem, None, None, dynamics=bl.HeavyBall(lr=0.5), steps=20, hypergrad=bl.Reverse(), max_steps=100)
    with pytest.raises(ValueError, match=r"must be an integer >= steps=20, got 10"):
        hpo.HyperStep(problem, None, None, dynamics=bl.HeavyBall(lr=0.5), steps=20, hypergrad=bl.Implicit(), max_steps=10)


# ------------------------------------------------------------------------ options and strategies
def test_configs_hold_strategy_objects_and_keep_the_task_defaults():
    lr, sched, l2, clean = hpo.LRConfig(), hpo.LRConfig(schedule=True), hpo.L2Config(), hpo.CleanConfig()
    assert lr.hypergrad == bl.Forward() and sched.hypergrad == bl.Reverse()
    certified = bl.Implicit(bl.CG(maxiter=300, tol=1e-3), tol=1e-2, warm_start=True)
    assert l2.hypergrad == clean.hypergrad == certified
    assert l2.summary()["hypergrad"] == "implicit-cg:300:0.001:tol=0.01:warm-start"
    # warm-started, 30 inner steps at a time until certified, at most the refit's length
    assert l2.warm_start and l2.steps == 30 and l2.max_inner_steps == l2.eval_steps == 300
    assert clean.warm_start and clean.steps == 30 and clean.max_inner_steps == clean.eval_steps == 500
    rev = hpo.L2Config(hypergrad=bl.Reverse())
    assert not rev.warm_start and rev.steps == rev.eval_steps == 300  # unrolled: the whole refit from w_0 = 0
    assert rev.max_inner_steps is None
    neumann = hpo.L2Config(hypergrad=bl.Implicit(bl.Neumann(maxiter=50, alpha=0.5)))
    assert neumann.warm_start and neumann.summary()["hypergrad"] == "implicit-neumann:50:0.5"
    # the same options from text (CLI / files) give equal configs: one parser, bilevel.hypergrad.from_string
    assert opts.from_text(hpo.LRConfig, {"hypergrad": "truncated:4", "inner_steps": "10"}) == \
        hpo.LRConfig(hypergrad=bl.Truncated(4), inner_steps=10)
    assert hpo.make_config("clean", hypergrad=bl.Checkpointed(10)).hypergrad == bl.Checkpointed(10)


@pytest.mark.parametrize(
    "task, options, option, message",
    [
        ("clean", {"corrupt_fraction": 1.0}, "corrupt_fraction", r"corrupt_fraction must be in \[0, 1\), got 1.0"),
        ("clean", {"weights": "softmax"}, "weights", "weights must be one of sigmoid, projection; got 'softmax'"),
        ("clean", {"hypergrad": bl.NoInner()}, "hypergrad", "no-inner treats w_T as a constant"),
        ("clean", {"hypergrad": bl.FirstOrder()}, "hypergrad", r"hypergrad=first-order: .*weights of the training "
                                                                "examples.*would be zero"),
        ("lr", {"hypergrad": bl.Implicit()}, "hypergrad", "`bilevel hpo lr` cannot use hypergrad=implicit-cg:100: .*"
                                                          "implicit hypergradient is zero"),
        ("lr", {"hypergrad": bl.NoInner()}, "hypergrad", "hypergradient would be zero"),
        ("lr", {"hypergrad": bl.FirstOrder()}, "hypergrad", "drops the curvature"),
        ("lr", {"hypergrad": 3}, "hypergrad", "hypergrad must be a bilevel.Strategy, got int"),
        ("lr", {"hypergrad": bl.Truncated(11), "inner_steps": 10}, "hypergrad", r"needs k <= steps, got steps=10"),
        ("lr", {"hypergrad": bl.Truncated(30), "online": True}, "hypergrad", r"T = 20 inner steps"),
        ("lr", {"momentum": 1.0}, "momentum", r"momentum must be in \(0, 1\), got 1.0"),
        ("lr", {"schedule": True, "online": True}, "schedule", "cannot be combined"),
        ("l2", {"hypergrad": bl.FirstOrder()}, "hypergrad", "weights of the L2 penalty"),
        ("l2", {"hyper_steps": 0}, "hyper_steps", r"hyper_steps must be in \[1, inf\], got 0"),
        ("l2", {"hyper_steps": 5.7}, "hyper_steps", "hyper_steps must be an integer, got 5.7"),
        ("l2", {"grid_min": 0.0, "grid_max": -1.0}, "grid_max", "grid_max=-1 is below grid_min=0"),
        ("l2", {"dataset": "cifar"}, "dataset", "dataset must be one of digits, mnist"),
        ("l2", {"device": "nonsense"}, "device", "invalid device 'nonsense'"),
        ("l2", {"colour": 1}, "colour", r"task 'l2' has no option\(s\) \['colour'\]"),
    ],
)
def test_config_errors_name_the_option(task, options, option, message):
    with pytest.raises(opts.OptionError, match=message) as e:
        hpo.make_config(task, **options)
    assert e.value.option == option


def _lr_problem(hidden=32, n_train=400, n_val=200):
    """The lr task's bilevel problem on digits, in float64 (what the refusals are about)."""
    x, y, k = hpo.load_dataset("digits")
    data = hpo.split_dataset(x.double(), y, n_train, n_val, 0, generator=torch.Generator().manual_seed(0), num_classes=k)
    model = hpo.mlp(64, hidden, k).double()
    loss = hpo.cross_entropy_loss(model)
    p0 = hpo.init_params(model, generator=torch.Generator().manual_seed(1))
    return bl.BilevelProblem(loss, loss), p0, data


def _lr_hypergradient(strategy, lr, momentum, steps, problem, p0, data, batch=None):
    h = {"log_lr": torch.tensor(math.log(lr), requires_grad=True),
         "logit_momentum": torch.tensor(math.log(momentum / (1 - momentum)), requires_grad=True)}
    batches = hpo.minibatches(data.train, 50, steps, generator=torch.Generator().manual_seed(2)) if batch is None else batch
    hg = bl.hypergradient(problem, p0, h, batches, (data.val.x, data.val.y), dynamics=heavy_ball(), steps=steps,
                          hypergrad=strategy)
    return torch.stack([hg.hparams["log_lr"], hg.hparams["logit_momentum"]])


def test_lr_refusals_are_true(f64):
    """Why `bilevel hpo lr` refuses implicit and first-order, checked against the exact (reverse) hypergradient."""
    problem, p0, data = _lr_problem()
    full = (data.train.x, data.train.y)
    exact = _lr_hypergradient(bl.Reverse(), 0.1, 0.5, 20, problem, p0, data, batch=full)
    assert float(exact.abs().min()) > 1e-3
    # η and μ are not arguments of the inner objective: the implicit hypergradient is exactly zero
    with pytest.warns(InexactHypergradientWarning):  # 20 steps leave w_T far from a minimiser: true, and beside the point
        implicit = _lr_hypergradient(bl.Implicit(bl.Neumann(maxiter=10)), 0.1, 0.5, 20, problem, p0, data, batch=full)
    assert implicit.tolist() == [0.0, 0.0]
    # first-order drops the curvature terms: close to exact for a small step, biased towards larger steps, and with
    # the wrong sign for μ near the tuned values (η = 0.2, μ = 0.93: exact says lower μ, first-order raise it)
    small = [_lr_hypergradient(s, 0.01, 0.5, 100, problem, p0, data) for s in (bl.Reverse(), bl.FirstOrder())]
    assert torch.nn.functional.cosine_similarity(*small, dim=0) > 0.999
    exact, first = (_lr_hypergradient(s, 0.2, 0.93, 100, problem, p0, data) for s in (bl.Reverse(), bl.FirstOrder()))
    assert exact[1] > 0.1 and first[1] < 0 and first[0] < exact[0]


@pytest.mark.parametrize("task", ["l2", "clean"])
@pytest.mark.parametrize("strategy", [bl.FirstOrder(), bl.NoInner()])
def test_convex_refusals_are_true(f64, task, strategy):
    """λ of l2/clean acts on w_T only through the inner gradient: first-order and no-inner see no hypergradient."""
    from bilevel.hpo.clean import weighted_loss
    from bilevel.hpo.l2 import feature_l2_loss

    x, y = torch.randn(30, 5, dtype=torch.float64), torch.arange(30) % 3
    model = hpo.logistic_regression(5, 3).double()
    inner, name, size = (feature_l2_loss(model), "log_l2", 5) if task == "l2" else (weighted_loss(model, 1e-3), "logit", 30)
    problem = bl.BilevelProblem(inner, hpo.cross_entropy_loss(model))
    h = {name: torch.zeros(size, dtype=torch.float64, requires_grad=True)}
    p0 = hpo.init_params(model, zeros=True)

    def grad(s):
        w = bl.solve(problem, p0, h, (x, y), dynamics=bl.HeavyBall(lr=0.5, momentum=0.9), steps=20, hypergrad=s)
        value = problem.outer_loss(w, h, (x, y))
        (g,) = torch.autograd.grad(value, h[name], allow_unused=True) if value.requires_grad else (None,)
        return g

    assert float(grad(bl.Reverse()).abs().max()) > 1e-4  # the exact one is not zero
    g = grad(strategy)
    assert g is None or float(g.abs().max()) == 0.0


def test_l2_forward_and_reverse_walk_the_same_path():
    """The whole vocabulary where meaningful: forward mode on 64 L2 weights = reverse mode (independent mechanisms)."""
    common = dict(n_train=100, n_val=200, n_test=100, progress=False, hyper_steps=3, grid_points=2, eval_steps=40)
    fwd = hpo.run(hpo.L2Config(**common, hypergrad=bl.Forward()))
    rev = hpo.run(hpo.L2Config(**common, hypergrad=bl.Reverse()))
    assert fwd["hypergrad"] == "forward"
    assert fwd["tuned_val_loss"] == pytest.approx(rev["tuned_val_loss"], rel=1e-5)
    assert fwd["tuned_log10_l2"]["max"] == pytest.approx(rev["tuned_log10_l2"]["max"], rel=1e-4)


# ------------------------------------------------------------------------------------------ CLI
def test_cli_clean_end_to_end(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["hpo", "clean", "--n-train", "200", "--n-val", "200", "--n-test", "200",
                                       "--hyper-steps", "5", "--out", str(out), "--no-progress",
                                       "--threads", "1"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mean_weight_corrupted"] < metrics["mean_weight_clean"]
    assert f'"f1": {metrics["f1"]}' in result.output and f"wrote {out}/metrics.json" in result.output
    assert {p.name for p in out.iterdir()} >= {"log.csv", "metrics.json", "weights_hist.png", "history.png"}


TINY = ["--dataset", "digits", "--n-train", "100", "--n-val", "100", "--n-test", "100", "--no-progress", "--threads", "1"]


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["hpo", *args])
    assert "Traceback" not in result.output and (result.exit_code != 1 or "Error:" in result.output), result.output
    return result.exit_code, result.output


def _numbers(metrics: dict) -> dict:
    """metrics.json without its timings."""
    return {k: v for k, v in metrics.items() if not k.endswith("_seconds")}


def test_cli_lr_truncated_records_the_strategy(tmp_path):
    """`bilevel hpo lr --hypergrad truncated:4`: the learners' grammar; the same run as from Python."""
    code, output = _cli("lr", *TINY, "--hypergrad", "truncated:4", "--inner-steps", "8", "--hyper-steps", "3",
                        "--hyper-lr", "0.2", "--batch-size", "50", "--out", str(tmp_path))
    assert code == 0, output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["hypergrad"] == metrics["config"]["hypergrad"] == "truncated:4" and '"hypergrad": "truncated:4"' in output
    python = hpo.run(hpo.LRConfig(n_train=100, n_val=100, n_test=100, progress=False, hypergrad=bl.Truncated(4), inner_steps=8,
                                  hyper_steps=3, hyper_lr=0.2, batch_size=50))
    assert metrics["tuned_lr"] == python["tuned_lr"] != metrics["initial_lr"]
    assert metrics["tuned_momentum"] == python["tuned_momentum"]


def test_cli_l2_implicit_neumann(tmp_path):
    """`--hypergrad implicit-neumann:50:0.5`: warm-started like the default, and certified at the library's tol = 1e-3.

    50 Neumann terms leave half the linear-solve residual (measured 0.50), so every hyper-step warns with that
    number, which the log records too; the certified default (CG to 1e-3) stays silent.
    """
    common = ["--hyper-steps", "4", "--grid-points", "3", "--eval-steps", "100"]
    with pytest.warns(InexactHypergradientWarning, match=r"Linear-solve residual .* \(ABOVE tol\) after 50 Neumann") as caught:
        code, output = _cli("l2", *TINY, *common, "--hypergrad", "implicit-neumann:50:0.5", "--out", str(tmp_path / "neumann"))
    assert code == 0, output
    with warnings.catch_warnings():
        warnings.simplefilter("error", InexactHypergradientWarning)
        code, output = _cli("l2", *TINY, *common, "--out", str(tmp_path / "cg"))
    assert code == 0, output
    neumann, cg = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("neumann", "cg"))
    assert neumann["hypergrad"] == neumann["config"]["hypergrad"] == "implicit-neumann:50:0.5"
    assert neumann["config"]["inner_steps"] == 30  # warm-started implicit: 30 inner steps at a time
    assert len([w for w in caught if issubclass(w.category, InexactHypergradientWarning)]) == 4
    assert neumann["linear_residual_max"] > 0.1 and cg["linear_residual_max"] <= 1e-2
    assert neumann["grid_best_l2"] == cg["grid_best_l2"]  # same data, same grid
    assert neumann["tuned_val_loss"] < neumann["grid_val_loss"] and cg["tuned_val_loss"] < cg["grid_val_loss"]
    for key in ("mean", "min", "max"):  # the same linear system, Neumann's solution off by its residual
        assert neumann["tuned_log10_l2"][key] == pytest.approx(cg["tuned_log10_l2"][key], abs=0.05)


def test_cli_yaml_config_is_the_same_as_flags(tmp_path):
    flags = ["--hypergrad", "checkpointed:4", "--inner-steps", "8", "--hyper-steps", "2", "--batch-size", "50",
             "--momentum", "0.6"]
    code, output = _cli("lr", *TINY, *flags, "--out", str(tmp_path / "flags"))
    assert code == 0, output
    (tmp_path / "run.yaml").write_text("hypergrad: checkpointed:4\ninner-steps: 8\nhyper_steps: 2\nbatch_size: 50\n"
                                       "momentum: 0.6\ndataset: digits\nn_train: 100\nn_val: 100\nn_test: 100\n"
                                       "progress: false\nthreads: 1\n")
    code, output = _cli("lr", "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "yaml"))
    assert code == 0, output
    by_flags, by_file = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("flags", "yaml"))
    assert by_flags["config"].pop("out") != by_file["config"].pop("out")
    assert _numbers(by_flags) == _numbers(by_file) and by_file["hypergrad"] == "checkpointed:4"
    # a flag overrides the file
    code, output = _cli("lr", "--config", str(tmp_path / "run.yaml"), "--hyper-steps", "1", "--out", str(tmp_path / "o"))
    assert code == 0 and len(_csv_rows(tmp_path / "o" / "log.csv")) == 1


@pytest.mark.parametrize(
    "task, text, message",
    [
        ("lr", "hyper_steps: 5.7\n", "Invalid value for '--hyper-steps': hyper_steps must be an integer, got 5.7"),
        ("lr", "hypergrad: implicit-cg:30\n", "`bilevel hpo lr` cannot use hypergrad=implicit-cg:30"),
        ("lr", "hypergrad: truncated\n", "Invalid value for '--hypergrad': hypergradient 'truncated'"),
        ("l2", "hypergrad: no-inner\n", "`bilevel hpo l2` cannot use hypergrad=no-inner"),
        ("clean", "corrupt_fraction: 1.5\n", r"corrupt_fraction must be in [0, 1), got 1.5"),
        ("clean", "truncate: 3\n", "unknown option(s) ['truncate']"),
    ],
)
def test_cli_bad_config_file_is_a_usage_error(tmp_path, task, text, message):
    (tmp_path / "c.yaml").write_text(text)
    code, output = _cli(task, "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "x"), "--no-progress")
    assert code == 2 and message in " ".join(output.split()), output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["clean", "--corrupt-fraction", "1.0"], "Invalid value for '--corrupt-fraction'"),
        (["clean", "--corrupt-fraction", "-0.5"], "Invalid value for '--corrupt-fraction'"),
        (["clean", "--n-val", "0"], r"Invalid value for '--n-val': n_val must be in [1, inf], got 0"),
        (["l2", "--data-root", "/no/such/folder"], "Invalid value for '--data-root': data root /no/such/folder does not exist"),
        (["lr", "--hypergrad", "implicit"], "Invalid value for '--hypergrad': `bilevel hpo lr` cannot use "
                                            "hypergrad=implicit-cg:20: the learning rate and momentum are coefficients"),
        (["lr", "--hypergrad", "implicit-neumann:50:0.5"], "the implicit hypergradient is zero"),
        (["lr", "--hypergrad", "no-inner"], "cannot use hypergrad=no-inner: no-inner treats w_T as a constant"),
        (["lr", "--hypergrad", "first-order"], "cannot use hypergrad=first-order"),
        (["lr", "--hypergrad", "truncated:50", "--inner-steps", "10"], "Truncated(k=50) needs k <= steps, got steps=10"),
        (["l2", "--hypergrad", "first-order"], "`bilevel hpo l2` cannot use hypergrad=first-order"),
        (["clean", "--hypergrad", "no-inner"], "`bilevel hpo clean` cannot use hypergrad=no-inner"),
        (["lr", "--hypergrad", "magic"], ("Invalid value for '--hypergrad': ", "unknown hypergradient 'magic'", "reverse")),
        (["lr", "--hypergrad", "truncated"], ("Invalid value for '--hypergrad': hypergradient 'truncated'", "e.g. truncated:10")),
        (["lr", "--truncate", "3"], "No such option '--truncate'"),
        (["l2", "--cg-iters", "3"], "No such option '--cg-iters'"),
        (["lr", "--hyper-steps", "two"], "Invalid value for '--hyper-steps'"),
        (["l2", "--n-train", "5000"], "Invalid value for '--n-train'"),
        (["l2", "--threads", "0"], "Invalid value for '--threads'"),
    ],
)
def test_cli_bad_options_are_usage_errors(tmp_path, args, message):
    result = CliRunner().invoke(main, ["hpo", *args, "--out", str(tmp_path / "x"), "--no-progress"])
    assert result.exit_code == 2, result.output
    for part in (message,) if isinstance(message, str) else message:
        assert part in " ".join(result.output.split())  # click wraps long messages
    assert "Traceback" not in result.output and not isinstance(result.exception, ValueError)


def test_cli_missing_mnist_file(tmp_path):
    result = CliRunner().invoke(main, ["hpo", "clean", "--data-root", str(tmp_path), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert f"no MNIST under {tmp_path}" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x" / "metrics.json").exists()


def test_cli_diverging_run_is_a_clean_error(tmp_path):
    result = CliRunner().invoke(main, ["hpo", "lr", "--hyper-lr", "1e3", "--hyper-steps", "2", "--inner-steps", "5",
                                       "--n-train", "100", "--n-val", "50", "--n-test", "50", "--out", str(tmp_path), "--no-progress"])
    assert result.exit_code == 1
    assert "Error: inner_loss is not finite" in result.output and "Traceback" not in result.output


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An MNIST idx file (big-endian header: magic, then one int32 per dimension)."""
    magic = {3: 2051, 1: 2049}[array.ndim]
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_mnist_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 3), ("t10k", 2)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", np.full((n, 28, 28), 51))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n))
    x, y, k = hpo.load_dataset("mnist", tmp_path)
    assert x.shape == (5, 784) and float(x.max()) == pytest.approx(0.2) and y.tolist() == [0, 1, 2, 0, 1]
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(hpo.OptionError, match="torchvision could not load MNIST"):
        hpo.load_dataset("mnist", tmp_path)


@pytest.mark.parametrize("script", ["hpo_lr.py", "hpo_l2.py", "hpo_clean.py"])
def test_examples_run(tmp_path, script, monkeypatch, capsys):
    """Each example script runs end to end on digits with 2 hyper-steps (2-5 s each)."""
    import runpy

    path = Path(__file__).resolve().parents[1] / "examples" / script
    monkeypatch.setattr("sys.argv", [str(path), "--hyper-steps", "2", "--out", str(tmp_path)])
    runpy.run_path(str(path), run_name="__main__")
    assert len(_csv_rows(tmp_path / "log.csv")) == 2
    assert {"hpo_lr.py": "tuned ", "hpo_l2.py": "per-feature L2", "hpo_clean.py": "F1"}[script] in capsys.readouterr().out
