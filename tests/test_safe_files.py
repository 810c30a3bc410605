"""Opening a file never runs code: crafted model files and checkpoints are refused and their payloads never run."""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import bilevel
from bilevel.checkpoint import CheckpointError, load_checkpoint
from bilevel.cli import main
from bilevel.io import ModelFileError

SIN = ["--dataset", "sinusoid", "--shots", "2", "--queries", "2", "--meta-batch", "2", "--val-every", "2",
       "--val-episodes", "2", "--test-episodes", "2", "--checkpoint-every", "2", "--inner-lr", "0.01", "--no-progress",
       "--no-tensorboard"]


class _Payload:
    """Unpickling this calls os.system (what a crafted file would do)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _trained(tmp_path: Path) -> Path:
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["maml", "train", *SIN, "--iterations", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def test_a_model_file_naming_os_system_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    out = _trained(tmp_path)
    payload = torch.load(out / "model.pt", weights_only=True)
    for version, key, value in ((1, "factory", "os:system"), (2, "learner", "os:system"), (1, "factory", "posix:system")):
        crafted = dict(payload, version=version, config={"command": f"touch {marker}"})
        crafted.pop("learner" if key == "factory" else "factory", None)
        crafted[key] = value
        path = tmp_path / f"crafted-{version}-{value}.pt"
        torch.save(crafted, path)
        with pytest.raises(ModelFileError, match="os:system|posix:system"):
            bilevel.load(path)
        r = CliRunner().invoke(main, ["maml", "eval", "--checkpoint", str(path), "--episodes", "1"])
        assert r.exit_code == 2 and "registered" in r.output and "Traceback" not in r.output, r.output
    assert not marker.exists()


def test_pickled_payloads_in_model_files_and_checkpoints_never_run(tmp_path):
    marker = tmp_path / "marker"
    out = _trained(tmp_path)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    ckpt["best"] = _Payload(f"touch {marker}")
    torch.save(ckpt, out / "checkpoint.pt")  # a crafted checkpoint with a __reduce__ payload
    with pytest.raises(CheckpointError, match="Python objects other than tensors"):
        load_checkpoint(out / "checkpoint.pt")
    r = CliRunner().invoke(main, ["maml", "train", *SIN, "--iterations", "4", "--out", str(out), "--resume"])
    assert r.exit_code == 2 and "refused unread" in r.output, r.output
    model = torch.load(out / "model.pt", weights_only=True)
    model["metadata"] = _Payload(f"touch {marker}")
    torch.save(model, tmp_path / "evil.pt")
    with pytest.raises(ModelFileError, match="refused unread"):
        bilevel.load(tmp_path / "evil.pt")
    # a plain pickle (not a torch zip file) is not even opened
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps(_Payload(f"touch {marker}")))
    with pytest.raises(ModelFileError, match="not a PyTorch file"):
        bilevel.load(tmp_path / "plain.pkl")
    assert not marker.exists()


def test_model_files_of_the_previous_format_load_when_they_name_a_registered_learner(tmp_path):
    out = _trained(tmp_path)
    new = torch.load(out / "model.pt", weights_only=True)
    options = dict(new["config"]["options"])
    old = {k: v for k, v in new.items() if k not in ("learner", "config")}
    old.update(version=1, factory="learners.maml:MAML",
               config={"example_shape": new["config"]["example_shape"], "ways": new["config"]["ways"], **options})
    torch.save(old, tmp_path / "v1.pt")
    model = bilevel.load(tmp_path / "v1.pt")
    assert model.name == "maml" and model.learner.config.inner_lr == 0.01
    x = torch.linspace(-3, 3, 6)[:, None]
    ref = bilevel.load(out / "model.pt")
    assert torch.equal(model.predict(x[:3], torch.sin(x[:3]), x[3:]), ref.predict(x[:3], torch.sin(x[:3]), x[3:]))


def test_checkpoints_and_model_files_are_plain_data(tmp_path):
    out = _trained(tmp_path)
    for name in ("checkpoint.pt", "model.pt", "best.pt"):
        with zipfile.ZipFile(out / name) as z:  # torch's format: a zip with one pickle of plain containers
            assert any(n.endswith("data.pkl") for n in z.namelist())
        torch.load(out / name, weights_only=True)  # loads with the restricted unpickler
    with pytest.raises(ModelFileError, match="is a training checkpoint, not a model file"):
        bilevel.load(out / "checkpoint.pt")
    (out / "model.pt").replace(out / "copy.pt")
    (out / "copy.pt").replace(out / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="is a model file .*not a training checkpoint"):
        load_checkpoint(out / "checkpoint.pt")
