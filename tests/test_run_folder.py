"""One run per folder: locked while it runs, never overwritten, resumable only by the same run."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from bilevel.cli import main
from bilevel.run_folder import RunFolder, RunFolderBusy, RunFolderError

REPO = Path(__file__).resolve().parents[1]
SIN = ["--dataset", "sinusoid", "--shots", "2", "--queries", "2", "--meta-batch", "2", "--val-every", "2",
       "--val-episodes", "2", "--test-episodes", "2", "--checkpoint-every", "2", "--inner-lr", "0.01", "--no-progress",
       "--no-tensorboard"]


def test_a_second_process_on_the_same_out_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "bilevel.cli", "maml", "train", *SIN, "--iterations", "100000", "--out", str(out)]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / ".lock.json").exists() and time.time() < deadline:
            time.sleep(0.05)
        assert (out / ".lock.json").exists(), "the first run never took the folder"
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"is in use by another run (pid {first.pid} on host" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait()
    # the lock died with its process: the folder can be resumed once the first run is gone
    folder = RunFolder(out, resume=(out / "checkpoint.pt").exists())
    folder.acquire()
    folder.release()


def test_in_process_lock_and_contents_checks(tmp_path):
    with RunFolder(tmp_path / "a", resume=False):
        with pytest.raises(RunFolderBusy, match="in use by another run"):
            RunFolder(tmp_path / "a", resume=False).acquire()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "model.pt").write_bytes(b"x")
    (tmp_path / "b" / "metrics.json").write_text("{}")
    with pytest.raises(RunFolderError, match=r"already holds a run \(model.pt, metrics.json\); it has no checkpoint"):
        RunFolder(tmp_path / "b", resume=False).acquire()
    with pytest.raises(RunFolderError, match="no checkpoint"):
        RunFolder(tmp_path / "b", resume=True).acquire()
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match="exists and is not a folder"):
        RunFolder(tmp_path / "file", resume=False).acquire()
    with pytest.raises(RunFolderError, match="cannot be created"):
        RunFolder(tmp_path / "file" / "sub", resume=False).acquire()


def test_a_folder_with_another_runs_model_is_refused_without_resume(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.pt").write_bytes(b"someone else's model")
    r = CliRunner().invoke(main, ["maml", "train", *SIN, "--iterations", "2", "--out", str(out)])
    assert r.exit_code == 2 and "already holds a run (model.pt)" in r.output, r.output
    assert (out / "model.pt").read_bytes() == b"someone else's model"


def test_resume_checks_iterations_and_normalises_the_data_root(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["maml", "train", *SIN, "--data-root", str(data), "--iterations", "4", "--out", str(out)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["maml", "train", *SIN, "--data-root", str(data), "--iterations", "2", "--out", str(out),
                                  "--resume"])
    assert r.exit_code == 2 and "already at iteration 4; pass --iterations >= 4" in r.output, r.output
    monkeypatch.chdir(tmp_path)  # the same root, relative: the same run
    r = CliRunner().invoke(main, ["maml", "train", *SIN, "--data-root", "data", "--iterations", "6", "--out", str(out),
                                  "--resume"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "metrics.json").read_text())["iterations"] == 6


def test_outputs_get_ordinary_permissions(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["maml", "train", *SIN, "--iterations", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    mask = os.umask(0)
    os.umask(mask)
    for name in ("model.pt", "best.pt", "checkpoint.pt", "metrics.json", "log.csv", "config.yaml"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~mask, name
