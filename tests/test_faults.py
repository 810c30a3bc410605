"""Every fault a message, never a traceback: one row per situation of the README's "Faults and bad input" table.

Each row runs the real command line (click's runner, or a subprocess where a signal or a file system is
involved) and checks the exit code (0 ok, 1 run error, 2 usage error, 130 interrupted) and the message.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import bilevel
from bilevel.cli import main
from bilevel.io import ModelFileError

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
SIN = ["--dataset", "sinusoid", "--shots", "2", "--queries", "2", "--meta-batch", "2", "--val-every", "2",
       "--val-episodes", "2", "--test-episodes", "2", "--checkpoint-every", "2", "--inner-lr", "0.01", "--no-progress",
       "--no-tensorboard"]
GLYPHS = ["--dataset", "glyphs", "--ways", "5", "--shots", "1", "--queries", "2", "--meta-batch", "2", "--filters", "4",
          "--val-every", "2", "--val-episodes", "2", "--test-episodes", "2", "--no-progress", "--no-tensorboard"]


def cli(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in r.output, r.output
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise AssertionError(f"uncaught {r.exception!r}:\n{r.output}") from r.exception
    return r.exit_code, r.output


@pytest.fixture(scope="module")
def sin_run(tmp_path_factory) -> Path:
    """A finished 4-iteration sinusoid MAML run (copied by the tests that damage it)."""
    out = tmp_path_factory.mktemp("sin") / "run"
    code, text = cli("maml", "train", *SIN, "--iterations", "4", "--out", out)
    assert code == 0, text
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns(".lock", ".lock.json"))
    return dst


# --------------------------------------------------------------------------- damaged files and --resume
@pytest.mark.parametrize(("damage", "message"), [
    ("truncate-checkpoint", "truncated"),
    ("empty-checkpoint", "is empty (0 bytes)"),
    ("model-over-checkpoint", "is a model file (model.pt), not a training checkpoint"),
    ("truncate-best", "best model"),
    ("text-checkpoint", "is not a PyTorch file"),
])
def test_damaged_files_are_reported_when_resume_starts(sin_run, tmp_path, damage, message):
    out = _copy(sin_run, tmp_path)
    ckpt, best = out / "checkpoint.pt", out / "best.pt"
    if damage == "truncate-checkpoint":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    elif damage == "empty-checkpoint":
        ckpt.write_bytes(b"")
    elif damage == "model-over-checkpoint":
        shutil.copy(out / "model.pt", ckpt)
    elif damage == "truncate-best":
        best.write_bytes(best.read_bytes()[:100])
    else:
        ckpt.write_text("not a checkpoint\n")
    before = (out / "metrics.json").read_text()
    code, text = cli("maml", "train", *SIN, "--iterations", "8", "--out", out, "--resume")
    assert code == 2 and message in text and str(out) in text, text
    assert (out / "metrics.json").read_text() == before  # nothing was trained or written


def test_a_junk_line_in_the_log_is_dropped_with_a_warning(sin_run, tmp_path):
    out = _copy(sin_run, tmp_path)
    with open(out / "log.csv", "a") as f:
        f.write("\x00\x00garbage,train,1,1,1,1,1\n")
    with pytest.warns(UserWarning, match="dropping unreadable line"):
        code, text = cli("maml", "train", *SIN, "--iterations", "6", "--out", out, "--resume")
    assert code == 0, text
    assert "garbage" not in (out / "log.csv").read_text()


def test_load_reports_text_files_and_checkpoints_in_one_line(sin_run, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelFileError, match=r"notes.txt is not a PyTorch file \(5 bytes"):
        bilevel.load(tmp_path / "notes.txt")
    with pytest.raises(ModelFileError, match="is a training checkpoint, not a model file") as info:
        bilevel.load(sin_run / "checkpoint.pt")
    assert "\x1b[" not in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------- output folders and file systems
def test_out_under_a_regular_file_and_eval_out_on_a_file(sin_run, tmp_path):
    (tmp_path / "f").write_text("x")
    code, text = cli("maml", "train", *SIN, "--iterations", "2", "--out", tmp_path / "f" / "run")
    assert code == 2 and "cannot be created" in text, text
    code, text = cli("maml", "eval", "--checkpoint", sin_run, "--episodes", "2", "--no-progress", "--out", tmp_path / "f")
    assert code == 2 and "--out" in text and "is a file" in text, text
    code, text = cli("maml", "eval", "--checkpoint", sin_run, "--episodes", "2", "--no-progress", "--out",
                     tmp_path / "f" / "ev")
    assert code == 2 and "--out" in text and "cannot be created (Not a directory)" in text, text


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs mount (needs the right to mount; skipped with the reason otherwise)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()

    def mount(*options: str) -> Path:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(mnt)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); needs root with CAP_SYS_ADMIN")
        return mnt

    yield mount
    subprocess.run(["umount", str(mnt)], capture_output=True)


def test_read_only_out_and_eval_out(sin_run, tmpfs):
    mnt = tmpfs("ro", "size=64k")
    code, text = cli("maml", "train", *SIN, "--iterations", "2", "--out", mnt)
    assert code == 2 and "is not writable" in text, text
    code, text = cli("maml", "train", *SIN, "--iterations", "2", "--out", mnt / "sub")
    assert code == 2 and "cannot be created (Read-only file system)" in text, text
    code, text = cli("maml", "eval", "--checkpoint", sin_run, "--episodes", "2", "--no-progress", "--out", mnt / "ev")
    assert code == 2 and "--out" in text and "cannot be created (Read-only file system)" in text, text


def test_disk_full_is_a_run_error_and_the_checkpoint_resumes_exactly(tmp_path, tmpfs):
    mnt = tmpfs("size=96k")
    out = mnt / "run"
    args = ["maml", "train", *SIN, "--iterations", "40", "--checkpoint-every", "4"]
    code, text = cli(*args, "--out", out)
    assert code == 1 and "No space left on device" in text and "--resume" in text, text
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)  # intact: written atomically
    assert 4 <= ckpt["iteration"] < 40
    moved = tmp_path / "moved"
    shutil.copytree(out, moved, ignore=shutil.ignore_patterns(".lock", ".lock.json", ".*.tmp"))
    code, text = cli(*args, "--out", moved, "--resume")
    assert code == 0, text
    ref = tmp_path / "ref"
    assert cli(*args, "--out", ref)[0] == 0
    a = torch.load(ref / "model.pt", weights_only=True)["state"]
    b = torch.load(moved / "model.pt", weights_only=True)["state"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- interrupts and divergence
def _as_in_a_terminal() -> None:
    """SIGINT back to its default in the child, as for a command run in a terminal's foreground: a test
    runner started in the background by a shell without job control inherits SIGINT *ignored*, and Python
    then keeps ignoring it (so the run would never see the Ctrl-C this test sends)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_names_the_checkpoint_and_the_resume_command(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "bilevel.cli", "maml", "train", *SIN, "--iterations", "100000", "--out", str(out)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_as_in_a_terminal)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()  # no-op once it has exited; never leave a run going if the interrupt was not honoured
    assert proc.returncode == 130, err
    assert f"The last checkpoint is {out / 'checkpoint.pt'}" in err and "--resume" in err and "Traceback" not in err, err
    assert not (out / ".lock.json").exists()


@pytest.mark.parametrize(("extra", "message"), [
    (["--inner-lr", "1e6"], "the meta-loss is"),
    (["--inner-lr", "1e6", "--inner-steps", "3"], "an inner loss is not finite"),
])
def test_divergence_is_a_run_error_that_cites_only_existing_files(tmp_path, extra, message):
    out = tmp_path / "run"
    (out / "tb").mkdir(parents=True)
    (out / "tb" / "events.out.stale").write_text("old")
    code, text = cli("maml", "train", *SIN[:-2], "--iterations", "3", "--out", out, *extra)
    assert code == 1 and message in text and "meta-iteration 1" in text and "No checkpoint was written yet" in text, text
    assert "check_finite" not in text
    assert not (out / "tb" / "events.out.stale").exists()  # a stale TensorBoard file does not survive


# --------------------------------------------------------------------------- options
@pytest.mark.parametrize(("args", "message"), [
    (["--device", "cuda:0"], "CUDA is not available" if not torch.cuda.is_available() else "GPU"),
    (["--device", "tpu"], "--device"),
    (["--inner-lr", "inf"], "inner_lr must be a finite number"),
    (["--inner-lr", "nan"], "inner_lr must be a finite number"),
    (["--lr-schedule", "50:-1"], "factors must be finite numbers > 0"),
    (["--ways", "1"], "ways must be in [2, inf], got 1"),
    (["--dataset", "omniglot", "--data-root", "EMPTY"], "no Omniglot set found"),
])
def test_bad_options_are_usage_errors(tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    args = [str(tmp_path / "empty") if a == "EMPTY" else a for a in args]
    code, text = cli("maml", "train", *SIN, "--iterations", "1", "--out", tmp_path / "o", *args)
    assert code == 2 and message in text, text
    assert "pass download=True" not in text


@pytest.mark.parametrize(("text", "message"), [("shots: 5.7\n", "shots must be an integer, got 5.7"),
                                               ("", "is empty: it sets no option"),
                                               ("# only a comment\n", "is empty: it sets no option")])
def test_config_files_are_validated_like_flags(tmp_path, text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    code, out = cli("maml", "train", "--config", cfg, "--out", tmp_path / "o")
    assert code == 2 and message in out, out


# --------------------------------------------------------------------------- eval knows its model
def test_eval_takes_the_data_from_the_model_and_refuses_what_it_cannot_do(tmp_path):
    out = tmp_path / "run"
    assert cli("maml", "train", *GLYPHS, "--iterations", "2", "--out", out)[0] == 0
    code, text = cli("maml", "eval", "--checkpoint", out, "--episodes", "2", "--no-progress")
    assert code == 0 and text.startswith("glyphs test accuracy:"), text
    code, text = cli("maml", "eval", "--checkpoint", out, "--episodes", "2", "--ways", "20", "--no-progress")
    assert code == 2 and "5-way output layer" in text, text
    code, text = cli("metaoptnet", "eval", "--checkpoint", out, "--episodes", "2")
    assert code == 2 and "holds a 'maml' model, not 'metaoptnet'" in text, text
    model = bilevel.load(out / "model.pt")
    x = torch.rand(9, 1, 28, 28, dtype=torch.float64)  # float64 inputs: cast to the model's precision
    logits = model.predict(x[:5], torch.arange(5), x[5:])
    assert logits.shape == (4, 5) and logits.dtype == torch.float32
    with pytest.raises(ValueError, match="5-way output layer; it cannot classify 7 classes"):
        model.predict(torch.rand(7, 1, 28, 28), torch.arange(7), x[5:].float())


def test_exit_codes_are_documented_in_the_help():
    code, text = cli("--help")
    assert code == 0 and "Exit codes: 0 success; 1 run error" in text and "2 usage error" in text and "130 interrupted" in text
    code, text = cli("maml", "train", "--help")
    assert "Exit codes:" in text


def test_decode_cache_of_the_wrong_shape_is_rebuilt(tmp_path):
    from bilevel.data.base import cached

    built = []

    def build():
        built.append(1)
        return {"images": torch.zeros(3, 1, 4, 4, dtype=torch.uint8)}

    cached("t", {"k": 1}, build, cache=True, cache_dir=tmp_path, images_shape=(3, 1, 4, 4))
    (path,) = tmp_path.glob("t-*.pt")
    torch.save({"images": torch.zeros(2, 1, 5, 5, dtype=torch.uint8)}, path)  # valid torch file, wrong shape
    with pytest.warns(UserWarning, match=r"holds images \(2, 1, 5, 5\).*expected uint8 images \(3, 1, 4, 4\); rebuilding"):
        value = cached("t", {"k": 1}, build, cache=True, cache_dir=tmp_path, images_shape=(3, 1, 4, 4))
    assert value["images"].shape == (3, 1, 4, 4) and len(built) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cached("t", {"k": 1}, build, cache=True, cache_dir=tmp_path, images_shape=(3, 1, 4, 4))
    assert len(built) == 2
    assert json.dumps(value["images"].shape[0]) == "3"
