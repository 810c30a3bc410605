"""Atomic file writes: the one helper every part of the package writes its files with.

Invariant: after :func:`atomic_write` returns, ``path`` holds the complete new content; if the
process dies (or the write fails, e.g. the disk is full) at any point before, ``path`` holds its
previous content (or does not exist) and no temporary file is left behind by a failure that
Python sees. The data is written to a temporary file in the same directory, flushed and
``fsync``-ed, given the permissions a plainly created file would get (``0o666 & ~umask``), then
``os.replace``-d over ``path``; the directory entry is ``fsync``-ed where supported.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_save", "atomic_write", "atomic_write_json", "atomic_write_text", "default_mode"]


def default_mode() -> int:
    """The permission bits of a newly created file under the current umask (0o644 under umask 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Write ``path`` atomically: ``write(f)`` fills a binary file object (see the module docstring).

    Args:
        path: destination; its parent folder is created if missing.
        write: called once with the open temporary file.

    Returns:
        ``path`` as a :class:`pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.filename is None:  # name the file the write was for
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
    try:  # persist the rename itself; not possible on every platform/file system
        dfd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (NaN/inf written as JSON's extensions)."""
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` with :func:`torch.save` to ``path`` atomically (see the module docstring).

    Args:
        obj: prefer tensors, dicts, lists, str and numbers, so that ``torch.load(weights_only=True)``
            can read it back (that is how every file of this package is read).
        path: destination file; its parent directory is created if missing.

    Returns:
        The destination as a :class:`pathlib.Path`.
    """
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))
