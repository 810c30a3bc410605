"""Model files and ``bilevel.load``: trained learners saved so that opening them never runs code.

Model file format (``format = "bilevel.model"``, ``version = 2``): a dict written with
:func:`torch.save` whose content is tensors and JSON-like values only, read back with
``torch.load(weights_only=True)`` (no pickle of arbitrary objects)::

    {"format": "bilevel.model", "version": 2, "bilevel_version": "0.2.0",
     "learner":   "maml",                         # a name in the learner registry
     "config":    {...},                          # JSON-like; how the registered factory rebuilds it
     "state":     {"net.convs.0.weight": Tensor, ...},
     "transform": {"name": "omniglot", "kind": "image", "size": [28, 28], ...},
     "metadata":  {...}}                          # free JSON-like info (dataset, ways, ...)

Rebuilding resolves ``learner`` through :mod:`bilevel.registry` only — nothing named by the file
is imported. For a :class:`bilevel.learner.MetaLearner` the config is its
:meth:`~bilevel.learner.MetaLearner.to_json` (example shape, ways, declared options); for any
other registered factory it is the factory's keyword arguments. Files of version 1 (which named
an import path ``module:Class``) load when that path is the one of a registered learner, and are
refused with a message otherwise.

Learner protocol (what a registered factory must build), see :class:`FewShotLearner`:

* ``load_state_dict(state: Mapping[str, Tensor])`` -- restores everything that was trained
  (``torch.nn.Module.load_state_dict`` qualifies).
* ``predict_episode(support_x, support_y, query_x, n_way) -> Tensor`` for ONE episode:
  ``support_x`` [n_support, *example_shape] float, ``support_y`` [n_support] int64 in
  0..n_way-1 (classification) or float [n_support, out] (regression, ``n_way=None``),
  ``query_x`` [n_query, *example_shape]; returns logits [n_query, n_way] (classification)
  or predictions [n_query, out] (regression). It is called with grad mode ENABLED, so
  learners that adapt with gradients at test time (MAML) work unchanged; learners that do not
  need gradients should wrap their work in ``torch.no_grad()``. The result is detached.
* Optional: if the learner is a :class:`torch.nn.Module`, :func:`load` moves it to ``device``
  and calls ``.eval()`` (dropout/DropBlock off).
"""
from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import Tensor

from bilevel import registry
from bilevel._atomic import atomic_save
from bilevel._version import __version__

__all__ = [
    "MODEL_FORMAT",
    "MODEL_FORMAT_VERSION",
    "FewShotLearner",
    "FewShotModel",
    "ModelFileError",
    "atomic_save",
    "load",
    "read_torch_file",
    "save_learner",
    "save_model",
]

MODEL_FORMAT = "bilevel.model"
MODEL_FORMAT_VERSION = 2


class ModelFileError(ValueError):
    """A file that is not a readable bilevel model file; the message names it and says why."""


def read_torch_file(path: Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` with one clear message for every way it can fail.

    Only tensors and JSON-like containers are accepted (no code runs while reading). ``what``
    names the file's role in messages (e.g. "model file", "checkpoint").

    Raises:
        FileNotFoundError: no file at ``path``.
        ModelFileError: empty, truncated, not a PyTorch file, or holding objects other than
            tensors and plain containers (possibly a crafted file).
    """
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise ModelFileError(f"{what} {path} is empty (0 bytes): it was not written completely")
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{what} {path} is not a PyTorch file ({size} bytes; truncated, or a text/other file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every reading failure becomes one message naming the file
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "Unsupported operand" in str(e):
            raise ModelFileError(f"{what} {path} holds Python objects other than tensors and plain containers; "
                                 "it was not written by bilevel (or was tampered with) and is refused unread") from None
        raise ModelFileError(f"{what} {path} cannot be read ({detail}); it may be truncated or corrupt") from None


@runtime_checkable
class FewShotLearner(Protocol):
    """What a model file's factory must return (see the module docstring for the contract)."""

    def load_state_dict(self, state: Mapping[str, Tensor]) -> Any: ...

    def predict_episode(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, n_way: int | None
    ) -> Tensor: ...


def _check_plain(value: Any, where: str) -> None:
    """Raise if ``value`` is not JSON-like (what ``weights_only`` loading and JSON accept)."""
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"{where} must be JSON-like (dict/list/str/int/float/bool/None): {e}"
        ) from e


def save_model(
    path: str | os.PathLike,
    *,
    learner: str,
    config: Mapping[str, Any],
    state: Mapping[str, Tensor],
    transform: Mapping[str, Any] | str,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Save a trained few-shot learner so that :func:`bilevel.load` can rebuild it.

    Invariant: ``load(path).learner`` is the registered factory ``learner`` rebuilt from
    ``config`` with ``state`` loaded, and ``load(path).transform`` maps a PIL image to exactly the
    tensor the learner was trained on (see :func:`bilevel.data.build_transform`). The file is
    written atomically and holds only tensors and JSON-like values. For a
    :class:`~bilevel.learner.MetaLearner`, :func:`save_learner` fills ``learner`` and ``config``.

    Args:
        path: destination file (conventionally ``*.pt``).
        learner: a name in the learner registry (:func:`bilevel.register_learner`); checked now,
            so that a file that cannot be loaded is never written.
        config: JSON-like: the MetaLearner's ``to_json()``, or the keyword arguments of any other
            registered factory.
        state: the learner's trained tensors, e.g. ``learner.state_dict()``.
        transform: evaluation-transform spec, e.g. ``dataset.transform`` or
            ``{"name": "omniglot", "size": 28}``; resolved to its complete form before saving.
        metadata: optional JSON-like information (dataset, ways, shots, accuracy, ...).

    Returns:
        The path written.
    """
    from bilevel.data.transforms import resolve_transform_spec

    registry.get_learner(learner)
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping, got {type(config).__name__}")
    bad_keys = [k for k in config if not isinstance(k, str)]
    if bad_keys:
        raise TypeError(f"config keys must be str, got {bad_keys}")
    _check_plain(dict(config), "config")
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping str -> Tensor, got {type(state).__name__}")
    for k, v in state.items():
        if not isinstance(k, str) or not isinstance(v, Tensor):
            raise TypeError(f"state must map str -> Tensor; key {k!r} has {type(v).__name__}")
    spec = resolve_transform_spec(transform)
    meta = dict(metadata or {})
    _check_plain(meta, "metadata")
    payload = {
        "format": MODEL_FORMAT,
        "version": MODEL_FORMAT_VERSION,
        "bilevel_version": __version__,
        "learner": learner,
        "config": dict(config),
        "state": {k: v.detach().cpu().clone() for k, v in state.items()},
        "transform": spec,
        "metadata": meta,
    }
    return atomic_save(payload, path)


def save_learner(path: str | os.PathLike, learner: Any, *, transform: Mapping[str, Any] | str,
                 metadata: Mapping[str, Any] | None = None) -> Path:
    """Save a registered :class:`~bilevel.learner.MetaLearner` instance (name and config from the registry)."""
    return save_model(path, learner=registry.name_of(type(learner)), config=learner.to_json(),
                      state=learner.state_dict(), transform=transform, metadata=metadata)


def _dtype_of(learner: Any) -> torch.dtype | None:
    """The floating dtype of a module learner's parameters (``None`` for other learners)."""
    if isinstance(learner, torch.nn.Module):
        for p in learner.parameters():
            if p.is_floating_point():
                return p.dtype
    return None


def _as_batch(x: Any, transform: Callable[[Any], Tensor], name: str) -> Tensor:
    """Tensor as is; a sequence of PIL images / arrays / tensors is transformed and stacked."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, Sequence) and not isinstance(x, (str, bytes)) and len(x) > 0:
        items = [t if isinstance(t, Tensor) else transform(t) for t in x]
        return torch.stack(items)
    raise TypeError(
        f"{name} must be a Tensor or a non-empty sequence of PIL images, got {type(x).__name__}"
    )


class FewShotModel:
    """A trained few-shot learner rebuilt from a model file (returned by :func:`bilevel.load`).

    Attributes:
        learner: the object built by the registered factory, with the trained state loaded.
        name: the learner's registered name.
        transform: evaluation transform, PIL image -> float tensor [C, H, W] (classification)
            or number/array -> float tensor [in_features] (regression).
        transform_spec: the resolved spec the transform was built from.
        config, metadata: as saved.
        task: ``"classification"`` or ``"regression"``.
        example_shape: per-example input shape the learner expects, e.g. ``(1, 28, 28)``.
        device: where inputs are moved before prediction.
    """

    def __init__(
        self,
        learner: Any,
        *,
        name: str,
        config: dict[str, Any],
        transform_spec: dict[str, Any],
        metadata: dict[str, Any],
        device: torch.device,
    ) -> None:
        from bilevel.data.transforms import build_transform, example_shape

        self.learner = learner
        self.name = name
        self.config = config
        self.metadata = metadata
        self.transform_spec = transform_spec
        self.transform = build_transform(transform_spec)
        self.task: str = "regression" if transform_spec["kind"] == "regression" else "classification"
        self.example_shape: tuple[int, ...] = example_shape(transform_spec)
        self.device = device

    def __repr__(self) -> str:
        return (
            f"FewShotModel(learner={self.name!r}, task={self.task!r}, "
            f"example_shape={self.example_shape}, transform={self.transform_spec['name']!r})"
        )

    def predict(self, support_x: Any, support_y: Any, query_x: Any) -> Tensor:
        """Logits for the query set of ONE episode (predictions for regression models).

        Invariant: ``N = support_y.max() + 1`` and every label 0..N-1 occurs in ``support_y``;
        the result has shape [n_query, N] and row ``i`` scores ``query_x[i]`` against the N
        classes, column ``j`` being the class labelled ``j`` in the support set.

        Args:
            support_x: [n_support, *example_shape] float tensor already passed through
                :attr:`transform` (or a list of PIL images, transformed here).
            support_y: [n_support] int64 labels in 0..N-1 (regression: float [n_support, out]).
            query_x: [n_query, *example_shape] (or a list of PIL images).

        Returns:
            Detached tensor [n_query, N] of logits (regression: [n_query, out]).
        """
        sx = _as_batch(support_x, self.transform, "support_x")
        qx = _as_batch(query_x, self.transform, "query_x")
        sy = support_y if isinstance(support_y, Tensor) else torch.as_tensor(support_y)
        for name, x in (("support_x", sx), ("query_x", qx)):
            if not x.is_floating_point():
                raise TypeError(
                    f"{name} must be a float tensor (pass images through model.transform), "
                    f"got dtype {x.dtype}"
                )
            if tuple(x.shape[1:]) != self.example_shape:
                raise ValueError(
                    f"{name} has shape {tuple(x.shape)}, expected [n, {', '.join(map(str, self.example_shape))}] "
                    f"(per-example shape {self.example_shape} produced by model.transform)"
                )
        n_support = sx.shape[0]
        n_way: int | None
        if self.task == "classification":
            if sy.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
                raise TypeError(f"support_y must be an integer tensor of labels, got dtype {sy.dtype}")
            if sy.ndim != 1 or sy.shape[0] != n_support:
                raise ValueError(
                    f"support_y must have shape [{n_support}] (one label per support example), "
                    f"got {tuple(sy.shape)}"
                )
            sy = sy.long()
            if int(sy.min()) < 0:
                raise ValueError(f"support_y labels must be in 0..N-1, found {int(sy.min())}")
            n_way = int(sy.max()) + 1
            present = torch.bincount(sy, minlength=n_way) > 0
            if not bool(present.all()):
                missing = torch.nonzero(~present).flatten().tolist()
                raise ValueError(
                    f"support_y must contain every label 0..{n_way - 1} at least once "
                    f"(N is inferred as max+1 = {n_way}); missing labels {missing}"
                )
        else:
            n_way = None
            sy = sy.to(torch.get_default_dtype()) if not sy.is_floating_point() else sy
            if sy.ndim == 1:
                sy = sy[:, None]
            if sy.ndim != 2 or sy.shape[0] != n_support:
                raise ValueError(
                    f"support_y must have shape [{n_support}, out] for a regression model, "
                    f"got {tuple(sy.shape)}"
                )
        check_ways = getattr(self.learner, "check_ways", None)
        if n_way is not None and callable(check_ways):
            check_ways(n_way)
        dev = self.device
        dtype = _dtype_of(self.learner)  # inputs in the learner's precision (e.g. float64 arrays for a float32 model)
        if dtype is not None:
            sx, qx = sx.to(dtype), qx.to(dtype)
            if sy.is_floating_point():
                sy = sy.to(dtype)
        out = self.learner.predict_episode(sx.to(dev), sy.to(dev), qx.to(dev), n_way)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"{self.name}.predict_episode returned {type(out).__name__}, expected a Tensor"
            )
        n_query = qx.shape[0]
        if self.task == "classification" and tuple(out.shape) != (n_query, n_way):
            raise ValueError(
                f"{self.name}.predict_episode returned shape {tuple(out.shape)}, "
                f"expected [n_query, N] = [{n_query}, {n_way}]"
            )
        if self.task == "regression" and (out.ndim != 2 or out.shape[0] != n_query):
            raise ValueError(
                f"{self.name}.predict_episode returned shape {tuple(out.shape)}, "
                f"expected [n_query, out] with n_query = {n_query}"
            )
        return out.detach()


def _learner_of(payload: Mapping[str, Any], path: Path) -> tuple[str, dict[str, Any]]:
    """(registered name, config) of a model file of version 1 or 2; nothing is imported."""
    version = payload.get("version")
    if version == MODEL_FORMAT_VERSION:
        name = payload.get("learner")
        try:
            registry.get_learner(name)
        except registry.UnknownLearnerError as e:
            raise ModelFileError(f"{path} was saved by learner {name!r}: {e}") from None
        return name, dict(payload["config"])
    if version == 1:  # named its factory by import path: accepted only if that is a registered learner's
        factory = payload.get("factory")
        name = registry.name_for_target(factory) if isinstance(factory, str) else None
        if name is None:
            raise ModelFileError(
                f"{path} (model format 1) names the factory {factory!r}, which is not a registered learner; "
                "bilevel never imports what a file names. If you trust this file and its code, register the "
                "class first (bilevel.register_learner(name, cls)) so that its import path matches"
            )
        config = dict(payload["config"])
        if registry.get_learner(name).is_meta_learner:  # v1 stored constructor kwargs; v2 the declared options
            config = {"example_shape": config.pop("example_shape"), "ways": config.pop("ways"), "options": config}
        return name, config
    raise ModelFileError(f"{path} has model-format version {version!r}; this bilevel ({__version__}) reads "
                         f"versions 1 and {MODEL_FORMAT_VERSION}")


def load(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    config_overrides: Mapping[str, Any] | None = None,
) -> FewShotModel:
    """Rebuild a trained few-shot learner saved by :func:`save_model` — without running code from the file.

    Invariant: ``load(path).predict(sx, sy, qx)`` equals the saved learner's
    ``predict_episode(sx, sy, qx, N)`` (eval mode), for tensors produced by ``.transform``.

    Args:
        path: a file written by :func:`save_model` (read with ``torch.load(weights_only=True)``;
            its learner is resolved through the registry only).
        device: where the learner and the inputs of ``predict`` are placed.
        config_overrides: options to replace before rebuilding (e.g. ``{"eval_steps": 10}`` to
            adapt longer at test time); validated like command-line values; unknown keys are refused.

    Returns:
        A :class:`FewShotModel` with ``.transform``, ``.predict``, ``.learner`` and ``.name``.

    Raises:
        FileNotFoundError: no such file. ModelFileError: anything else wrong with the file.
    """
    from bilevel.data.transforms import resolve_transform_spec

    path = Path(path)
    payload = read_torch_file(path, "model file")
    if isinstance(payload, dict) and payload.get("format") == "bilevel.checkpoint":
        raise ModelFileError(f"{path} is a training checkpoint, not a model file; load the run's model.pt "
                             "(written at the end of training), or continue training with --resume")
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{path} is not a bilevel model file (no format={MODEL_FORMAT!r}); "
                             "write model files with bilevel.save_model")
    for key in ("config", "state", "transform"):
        if key not in payload:
            raise ModelFileError(f"model file {path} lacks the key {key!r}")
    name, config = _learner_of(payload, path)
    entry = registry.get_learner(name)
    if entry.is_meta_learner:
        learner = entry.factory.from_json(config, config_overrides)
    else:
        if config_overrides:
            unknown = [k for k in config_overrides if k not in config]
            if unknown:
                raise ValueError(f"config_overrides {unknown} are not options of {name} (it has {sorted(config)})")
            config.update(config_overrides)
        learner = entry.factory(**config)
    for method in ("load_state_dict", "predict_episode"):
        if not callable(getattr(learner, method, None)):
            raise TypeError(
                f"learner {name!r} built {type(learner).__name__}, which lacks "
                f"{method}(); see bilevel.io.FewShotLearner"
            )
    dev = torch.device(device)
    try:
        learner.load_state_dict(payload["state"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise ModelFileError(f"the tensors in {path} do not fit learner {name!r} as configured in the file: "
                             f"{str(e).splitlines()[0]}") from None
    if isinstance(learner, torch.nn.Module):
        learner.to(dev)
        learner.eval()
    spec = resolve_transform_spec(payload["transform"])
    return FewShotModel(
        learner,
        name=name,
        config=config,
        transform_spec=spec,
        metadata=payload.get("metadata", {}),
        device=dev,
    )
