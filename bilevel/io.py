"""Checkpoint and inference plumbing: atomic writes, the model file format, ``bilevel.load``.

Model file format (``format = "bilevel.model"``, ``version = 1``), a dict saved with
:func:`torch.save` whose content loads with ``torch.load(weights_only=True)``::

    {"format": "bilevel.model", "version": 1, "bilevel_version": "0.1.0",
     "factory":   "learners.protonet:ProtoNet",   # import path "module:callable"
     "config":    {...},                          # JSON-like kwargs of the factory
     "state":     {"backbone.0.weight": Tensor, ...},
     "transform": {"name": "omniglot", "kind": "image", "size": [28, 28], ...},
     "metadata":  {...}}                          # free JSON-like info (dataset, ways, ...)

Rebuilding is ``learner = import(factory)(**config); learner.load_state_dict(state)``. The
factory is imported lazily with :mod:`importlib`, so ``bilevel`` never imports ``learners``.

Learner protocol (what ``factory(**config)`` must return), see :class:`FewShotLearner`:

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

import importlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "MODEL_FORMAT",
    "MODEL_FORMAT_VERSION",
    "FewShotLearner",
    "FewShotModel",
    "atomic_save",
    "load",
    "save_model",
]

MODEL_FORMAT = "bilevel.model"
MODEL_FORMAT_VERSION = 1


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` with :func:`torch.save` so that ``path`` is never seen half-written.

    Invariant: after the call ``path`` holds either its previous content or the complete new
    content, never a partial file, even if the process is killed mid-write. The data goes to a
    temporary file in the same directory, is flushed and ``fsync``-ed, then ``os.replace``-d over
    ``path`` (atomic on POSIX and Windows); the directory entry is ``fsync``-ed where supported.

    Args:
        obj: anything :func:`torch.save` accepts (prefer tensors, dicts, lists, str, numbers so
            that ``torch.load(weights_only=True)`` can read it back).
        path: destination file; its parent directory is created if missing.

    Returns:
        The destination as a :class:`pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # persist the rename itself; not possible on every platform/filesystem
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


@runtime_checkable
class FewShotLearner(Protocol):
    """What a model file's factory must return (see the module docstring for the contract)."""

    def load_state_dict(self, state: Mapping[str, Tensor]) -> Any: ...

    def predict_episode(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, n_way: int | None
    ) -> Tensor: ...


def _check_factory(factory: str) -> tuple[str, str]:
    if not isinstance(factory, str) or factory.count(":") != 1:
        raise ValueError(
            f"factory must be an import path 'package.module:callable', got {factory!r}"
        )
    module, attr = factory.split(":")
    if not module or not attr or not all(p.isidentifier() for p in module.split(".") + attr.split(".")):
        raise ValueError(
            f"factory must be an import path 'package.module:callable', got {factory!r}"
        )
    return module, attr


def _resolve_factory(factory: str) -> Callable[..., Any]:
    module_name, attr = _check_factory(factory)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {module_name!r} of factory {factory!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"factory {factory!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"factory {factory!r} is not callable (got {type(obj).__name__})")
    return obj


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
    factory: str,
    config: Mapping[str, Any],
    state: Mapping[str, Tensor],
    transform: Mapping[str, Any],
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Save a trained few-shot learner so that :func:`bilevel.load` can rebuild it.

    Invariant: ``load(path).learner`` is ``import(factory)(**config)`` with ``state`` loaded,
    and ``load(path).transform`` maps a PIL image to exactly the tensor the learner was trained
    on (see :func:`bilevel.data.build_transform`). The file is written atomically and loads
    with ``torch.load(weights_only=True)``.

    Args:
        path: destination file (conventionally ``*.pt``).
        factory: ``"package.module:callable"`` that rebuilds the learner from ``config``; it is
            checked to be importable now so that a broken file is never written.
        config: keyword arguments of the factory; JSON-like.
        state: the learner's trained tensors, e.g. ``learner.state_dict()``.
        transform: evaluation-transform spec, e.g. ``dataset.transform`` or
            ``{"name": "omniglot", "size": 28}``; resolved to its complete form before saving.
        metadata: optional JSON-like information (dataset, ways, shots, accuracy, ...).

    Returns:
        The path written.
    """
    from bilevel.data.transforms import resolve_transform_spec

    _resolve_factory(factory)
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping of factory kwargs, got {type(config).__name__}")
    bad_keys = [k for k in config if not isinstance(k, str)]
    if bad_keys:
        raise TypeError(f"config keys must be str (factory keyword arguments), got {bad_keys}")
    _check_plain(dict(config), "config")
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping str -> Tensor, got {type(state).__name__}")
    for k, v in state.items():
        if not isinstance(k, str) or not isinstance(v, Tensor):
            raise TypeError(f"state must map str -> Tensor; key {k!r} has {type(v).__name__}")
    spec = resolve_transform_spec(transform)
    meta = dict(metadata or {})
    _check_plain(meta, "metadata")
    from bilevel import __version__

    payload = {
        "format": MODEL_FORMAT,
        "version": MODEL_FORMAT_VERSION,
        "bilevel_version": __version__,
        "factory": factory,
        "config": dict(config),
        "state": {k: v.detach().cpu().clone() for k, v in state.items()},
        "transform": spec,
        "metadata": meta,
    }
    return atomic_save(payload, path)


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
        learner: the object built by the factory, with the trained state loaded.
        transform: evaluation transform, PIL image -> float tensor [C, H, W] (classification)
            or number/array -> float tensor [in_features] (regression).
        transform_spec: the resolved spec the transform was built from.
        factory, config, metadata: as saved.
        task: ``"classification"`` or ``"regression"``.
        example_shape: per-example input shape the learner expects, e.g. ``(1, 28, 28)``.
        device: where inputs are moved before prediction.
    """

    def __init__(
        self,
        learner: Any,
        *,
        factory: str,
        config: dict[str, Any],
        transform_spec: dict[str, Any],
        metadata: dict[str, Any],
        device: torch.device,
    ) -> None:
        from bilevel.data.transforms import build_transform, example_shape

        self.learner = learner
        self.factory = factory
        self.config = config
        self.metadata = metadata
        self.transform_spec = transform_spec
        self.transform = build_transform(transform_spec)
        self.task: str = "regression" if transform_spec["kind"] == "regression" else "classification"
        self.example_shape: tuple[int, ...] = example_shape(transform_spec)
        self.device = device

    def __repr__(self) -> str:
        return (
            f"FewShotModel(factory={self.factory!r}, task={self.task!r}, "
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
        dev = self.device
        out = self.learner.predict_episode(sx.to(dev), sy.to(dev), qx.to(dev), n_way)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"{self.factory}.predict_episode returned {type(out).__name__}, expected a Tensor"
            )
        n_query = qx.shape[0]
        if self.task == "classification" and tuple(out.shape) != (n_query, n_way):
            raise ValueError(
                f"{self.factory}.predict_episode returned shape {tuple(out.shape)}, "
                f"expected [n_query, N] = [{n_query}, {n_way}]"
            )
        if self.task == "regression" and (out.ndim != 2 or out.shape[0] != n_query):
            raise ValueError(
                f"{self.factory}.predict_episode returned shape {tuple(out.shape)}, "
                f"expected [n_query, out] with n_query = {n_query}"
            )
        return out.detach()


def load(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    config_overrides: Mapping[str, Any] | None = None,
) -> FewShotModel:
    """Rebuild a trained few-shot learner saved by :func:`save_model`.

    Invariant: ``load(path).predict(sx, sy, qx)`` equals the saved learner's
    ``predict_episode(sx, sy, qx, N)`` (eval mode), for tensors produced by ``.transform``.

    Args:
        path: a file written by :func:`save_model` (read with ``torch.load(weights_only=True)``).
        device: where the learner and the inputs of ``predict`` are placed.
        config_overrides: entries of the saved factory config to replace before rebuilding
            (e.g. ``{"eval_steps": 10}`` to adapt longer at test time); unknown keys are refused.

    Returns:
        A :class:`FewShotModel` with ``.transform``, ``.predict`` and ``.learner``.
    """
    from bilevel.data.transforms import resolve_transform_spec

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"cannot read model file {path}: {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise ValueError(
            f"{path} is not a bilevel model file (missing format={MODEL_FORMAT!r}); "
            "write it with bilevel.save_model"
        )
    if payload.get("version") != MODEL_FORMAT_VERSION:
        raise ValueError(
            f"{path} has model-format version {payload.get('version')!r}; this bilevel reads "
            f"version {MODEL_FORMAT_VERSION}"
        )
    for key in ("factory", "config", "state", "transform"):
        if key not in payload:
            raise ValueError(f"model file {path} lacks the key {key!r}")
    factory = payload["factory"]
    build = _resolve_factory(factory)
    config = dict(payload["config"])
    if config_overrides:
        unknown = [k for k in config_overrides if k not in config]
        if unknown:
            raise ValueError(f"config_overrides {unknown} are not options of {factory} (it has {sorted(config)})")
        config.update(config_overrides)
    learner = build(**config)
    for method in ("load_state_dict", "predict_episode"):
        if not callable(getattr(learner, method, None)):
            raise TypeError(
                f"factory {factory!r} returned {type(learner).__name__}, which lacks "
                f"{method}(); see bilevel.io.FewShotLearner"
            )
    dev = torch.device(device)
    learner.load_state_dict(payload["state"])
    if isinstance(learner, torch.nn.Module):
        learner.to(dev)
        learner.eval()
    spec = resolve_transform_spec(payload["transform"])
    return FewShotModel(
        learner,
        factory=factory,
        config=config,
        transform_spec=spec,
        metadata=payload.get("metadata", {}),
        device=dev,
    )
