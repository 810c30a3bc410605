"""The learner registry: the one place that maps a method name to the code that builds it.

Model files and checkpoints name their learner (``"learner": "maml"``); :func:`bilevel.load`,
``--resume`` and the command line resolve that name here and nowhere else, so opening a file
never imports or calls anything the file itself names.

Learners are registered

* by installed packages, through the entry-point group ``bilevel.learners``: an entry point is
  either a learner class (registered under the entry point's name) or a mapping
  ``{name: "module:Class"}`` (the built-in learners are the mapping ``learners:LEARNERS``); the
  classes are imported only when their name is first used;
* from Python, with :func:`register_learner` (e.g. in a script or a test), which is enough to
  get ``bilevel <name> train|eval``, checkpoints, ``--resume`` and :func:`bilevel.load`.

A registered factory is either a :class:`bilevel.learner.MetaLearner` subclass with a declared
``Config`` (full support: CLI, training loop, model files) or any callable returning an object
with ``load_state_dict`` and ``predict_episode`` (model files only, see :mod:`bilevel.io`).
"""
from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

__all__ = ["ENTRY_POINT_GROUP", "LearnerEntry", "UnknownLearnerError", "get_learner", "learner_names",
           "name_of", "register_learner", "unregister_learner"]

ENTRY_POINT_GROUP = "bilevel.learners"
_NAME = re.compile(r"^[a-z][a-z0-9-]*$")


class UnknownLearnerError(ValueError):
    """A learner name (from the command line or a file) that nothing registered."""


@dataclass
class LearnerEntry:
    """A registered learner: its name and its factory (imported on first use when lazy)."""

    name: str
    target: str  # "module:Class" for lazy entries, else the factory's own module:qualname
    _factory: Any = None

    @property
    def factory(self) -> Callable[..., Any]:
        """The class (or callable) that builds the learner; imports it on first use."""
        if self._factory is None:
            module, _, attr = self.target.partition(":")
            obj: Any = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
            self._factory = obj
        return self._factory

    @property
    def is_meta_learner(self) -> bool:
        from bilevel.learner import MetaLearner

        f = self.factory
        return isinstance(f, type) and issubclass(f, MetaLearner)


_REGISTRY: dict[str, LearnerEntry] = {}
_loaded_entry_points = False


def _target_of(factory: Callable[..., Any]) -> str:
    return f"{factory.__module__}:{factory.__qualname__}"


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"learner name must be lower-case letters, digits and '-' (a CLI command), got {name!r}")


def _add(name: str, entry: LearnerEntry, replace: bool) -> None:
    old = _REGISTRY.get(name)
    if old is not None and not replace and old.target != entry.target:
        raise ValueError(f"learner name {name!r} is already registered for {old.target}; "
                         "pick another name or pass replace=True")
    _REGISTRY[name] = entry


def _load_entry_points() -> None:
    global _loaded_entry_points
    if _loaded_entry_points:
        return
    _loaded_entry_points = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()
        if isinstance(obj, Mapping):
            for name, target in obj.items():
                _check_name(name)
                if not isinstance(target, str) or target.count(":") != 1:
                    raise TypeError(f"entry point {ep.name!r} ({ep.value}): {name!r} must map to 'module:Class', got {target!r}")
                _REGISTRY.setdefault(name, LearnerEntry(name, target))
        elif callable(obj):
            _check_name(ep.name)
            _REGISTRY.setdefault(ep.name, LearnerEntry(ep.name, _target_of(obj), obj))
        else:
            raise TypeError(f"entry point {ep.name!r} ({ep.value}) of group {ENTRY_POINT_GROUP!r} must be a learner "
                            f"class or a mapping name -> 'module:Class', got {type(obj).__name__}")


def register_learner(name: str, factory: Callable[..., Any], *, replace: bool = False) -> LearnerEntry:
    """Register ``factory`` under ``name`` (a CLI command name such as ``"my-maml"``).

    Args:
        name: lower-case letters, digits and ``-``.
        factory: a :class:`bilevel.learner.MetaLearner` subclass (CLI, training, checkpoints and
            model files) or any callable returning an object with ``load_state_dict`` and
            ``predict_episode`` (model files only).
        replace: allow replacing a different factory registered under the same name.

    Returns:
        The registry entry.
    """
    _check_name(name)
    if not callable(factory):
        raise TypeError(f"factory must be a class or callable, got {type(factory).__name__}")
    _load_entry_points()
    entry = LearnerEntry(name, _target_of(factory), factory)
    _add(name, entry, replace)
    return entry


def unregister_learner(name: str) -> None:
    """Remove ``name`` from the registry (tests use it to clean up)."""
    _REGISTRY.pop(name, None)


def learner_names() -> list[str]:
    """Every registered learner name, sorted."""
    _load_entry_points()
    return sorted(_REGISTRY)


def get_learner(name: str) -> LearnerEntry:
    """The entry registered as ``name``.

    Raises:
        UnknownLearnerError: naming ``name``, the registered names and how to register one.
    """
    _load_entry_points()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise UnknownLearnerError(
            f"no learner is registered as {name!r} (registered: {', '.join(sorted(_REGISTRY)) or 'none'}). "
            "Register it with bilevel.register_learner(name, LearnerClass) before loading, or through the "
            f"{ENTRY_POINT_GROUP!r} entry-point group of an installed package"
        )
    return _REGISTRY[name]


def name_of(factory: Callable[..., Any]) -> str:
    """The name under which ``factory`` (a class or callable) is registered.

    Raises:
        UnknownLearnerError: if it is not registered.
    """
    _load_entry_points()
    target = _target_of(factory)
    for name, entry in _REGISTRY.items():
        if entry._factory is factory or (entry._factory is None and entry.target == target):
            return name
    raise UnknownLearnerError(
        f"{target} is not a registered learner; register it with bilevel.register_learner('my-name', "
        f"{factory.__qualname__}) first"
    )


def name_for_target(target: str) -> str | None:
    """The registered name whose factory's import path is ``target`` (``module:Class``), if any.

    Used to read model files of format version 1, which named their factory by import path:
    the path is matched against the registry, never imported.
    """
    _load_entry_points()
    for name, entry in _REGISTRY.items():
        if entry.target == target:
            return name
    return None
