"""The run folder (``--out``): one run per folder, locked while it runs, never overwritten.

:class:`RunFolder` owns everything about the output folder of a training run:

* **an exclusive lock** (:mod:`filelock`, ``OUT/.lock``) held for the run's lifetime; a second
  process that tries to use the same folder gets :class:`RunFolderBusy` naming the pid and host
  that hold it (the operating system releases the lock when a process dies, so a killed run
  never leaves a stale lock);
* **refusal of another run's artefacts**: a folder holding ``model.pt``, ``metrics.json``,
  ``log.csv``, ``checkpoint.pt``, ``best.pt`` or ``config.yaml`` is refused unless the run
  resumes (``--resume``), and ``--resume`` needs a ``checkpoint.pt``;
* **``config.yaml``**, written when the run starts: the method, every resolved option, the
  command line, the seed and the versions of bilevel, torch and Python —
  ``bilevel <method> train --config OUT/config.yaml --out NEW`` repeats the run.

All files are written with :func:`bilevel._atomic.atomic_write` (the one atomic-write helper).
"""
from __future__ import annotations

import json
import os
import platform
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from bilevel._atomic import atomic_write_json, atomic_write_text
from bilevel._version import __version__

__all__ = ["ARTEFACTS", "CONFIG", "RunFolder", "RunFolderBusy", "RunFolderError", "read_config", "versions"]

CONFIG = "config.yaml"
#: files that belong to a run: a folder holding any of them is another run's
ARTEFACTS = ("model.pt", "metrics.json", "log.csv", "checkpoint.pt", "best.pt", CONFIG)
_LOCK = ".lock"
_HOLDER = ".lock.json"


class RunFolderError(ValueError):
    """``--out`` cannot be used for this run (another run's files, not writable, no checkpoint)."""


class RunFolderBusy(RunFolderError):
    """Another process holds the run folder's lock."""


def versions() -> dict[str, str]:
    """The versions a run records (bilevel, torch, Python, platform)."""
    import torch

    return {"bilevel": __version__, "torch": str(torch.__version__), "python": platform.python_version(),
            "platform": platform.platform()}


class RunFolder:
    """The output folder of one run (see the module docstring); use as a context manager.

    Args:
        path: the folder (created if missing).
        resume: the run continues the one in ``path`` (its ``checkpoint.pt`` must exist).
        command: the command line to record (default: ``sys.argv``).

    Raises (on entering):
        RunFolderBusy: another process holds the folder.
        RunFolderError: the folder holds another run's files (without ``resume``), has no
            checkpoint (with ``resume``), or cannot be created or written.
    """

    def __init__(self, path: str | os.PathLike, *, resume: bool, command: list[str] | None = None) -> None:
        self.path = Path(path)
        self.resume = resume
        self.command = list(sys.argv) if command is None else list(command)
        self._lock: FileLock | None = None

    # -- lifetime -------------------------------------------------------------------------------
    def __enter__(self) -> RunFolder:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> None:
        """Create the folder, take its lock and check what it holds (see the class docstring)."""
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"--out {self.path} exists and is not a folder; choose another --out")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunFolderError(f"--out {self.path} cannot be created ({e.strerror or e}); choose a folder you can "
                                 "write to") from None
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise RunFolderError(f"--out {self.path} is not writable; choose a folder you can write to")
        lock = FileLock(str(self.path / _LOCK))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise RunFolderBusy(f"--out {self.path} is in use by another run ({self._holder()}); wait for it to "
                                "finish or choose another --out") from None
        except OSError as e:
            raise RunFolderError(f"--out {self.path}: cannot create its lock file ({e.strerror or e}); choose a "
                                 "folder you can write to") from None
        self._lock = lock
        try:
            self._check_contents()
            atomic_write_json(self.path / _HOLDER, {"pid": os.getpid(), "host": socket.gethostname(),
                                                     "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                     "command": self.command})
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Give the lock back (idempotent)."""
        if self._lock is not None:
            try:
                (self.path / _HOLDER).unlink(missing_ok=True)
            except OSError:
                pass
            self._lock.release()
            self._lock = None

    def _holder(self) -> str:
        try:
            info = json.loads((self.path / _HOLDER).read_text())
            return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "a process that has not recorded itself yet"

    def _check_contents(self) -> None:
        present = [name for name in ARTEFACTS if (self.path / name).exists()]
        if self.resume:
            if not (self.path / "checkpoint.pt").exists():
                raise RunFolderError(f"--resume: there is no checkpoint in {self.path} (no checkpoint.pt) to continue; "
                                     "start a new run without --resume" + (
                                         f" in another --out (this one holds {', '.join(present)})" if present else ""))
        elif present:
            hint = ("pass --resume to continue it" if "checkpoint.pt" in present else
                    "it has no checkpoint to resume from")
            raise RunFolderError(f"--out {self.path} already holds a run ({', '.join(present)}); {hint}, or choose "
                                 "another --out")

    # -- files ----------------------------------------------------------------------------------
    def file(self, name: str) -> Path:
        """``OUT/name``."""
        return self.path / name

    def write_config(self, method: str, options: Mapping[str, Any], *, seed: int) -> Path:
        """Write ``config.yaml``: method, resolved options, command line, seed and versions."""
        import shlex

        import yaml

        body = {"method": method, "command": shlex.join(["bilevel", *self.command[1:]]) if self.command else "",
                "seed": seed, "versions": versions(), "options": dict(options)}
        text = ("# bilevel run configuration. Repeat this run with:\n"
                f"#   bilevel {method} train --config {self.path / CONFIG} --out NEW_FOLDER\n"
                + yaml.safe_dump(body, sort_keys=False, allow_unicode=True))
        return atomic_write_text(self.path / CONFIG, text)


def read_config(data: Mapping[str, Any], method: str, where: str) -> dict[str, Any]:
    """The options of a ``--config`` mapping: flat ``{option: value}`` or a ``config.yaml``.

    Raises:
        RunFolderError: a ``config.yaml`` of another method.
    """
    if "options" in data and "method" in data:
        if data["method"] != method:
            raise RunFolderError(f"{where} is the configuration of a {data['method']!r} run, not {method!r}; "
                                 f"use `bilevel {data['method']} train --config {where}`")
        options = data["options"]
        if not isinstance(options, Mapping):
            raise RunFolderError(f"{where}: 'options' must be a mapping of option names to values")
        return dict(options)
    return dict(data)
