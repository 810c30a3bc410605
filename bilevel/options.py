"""Declared options: one declaration per option, used by Python, the CLI and config files alike.

A configuration is a dataclass whose fields are declared with :func:`option`: the field's type
annotation, default, range, choices, help text and paper reference live in one place. From that
declaration

* Python construction validates (``MAML.Config(inner_lr=-1)`` raises :class:`OptionError`);
* :func:`from_text` converts values written as text or read from YAML/TOML/JSON — strictly:
  ``shots: 5.7`` is refused, never truncated to 5;
* :func:`to_json` / :func:`from_json` are inverse to each other (strategies are written with
  ``str(strategy)`` and parsed with :func:`bilevel.hypergrad.from_string`);
* the command line (:mod:`bilevel.cli`) generates one flag per field and converts it with
  :func:`from_text` too, so a flag and a config-file key can never be validated differently.

Supported field types: ``int``, ``float``, ``bool``, ``str``, :class:`bilevel.Strategy`,
``Schedule`` (a piecewise-constant list of ``(iteration, factor)``), each optionally ``| None``;
``dict`` and ``list`` fields are Python-only (``cli=False``).
"""
from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field
from typing import Any, Union

__all__ = [
    "Option",
    "OptionError",
    "Schedule",
    "cli_fields",
    "declared",
    "field_kind",
    "from_json",
    "from_text",
    "option",
    "to_json",
    "validate",
]

#: ``[(iteration, factor), ...]``: the factor applies from that iteration on.
Schedule = list[tuple[int, float]]


class OptionError(ValueError):
    """A bad option value; ``option`` names the field at fault (the CLI flag is ``--`` + dashes)."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option


@dataclass(frozen=True)
class Option:
    """The declaration of one option (stored in the dataclass field's metadata).

    Attributes:
        help: one-line help text (shown by ``--help``).
        min, max: inclusive bounds for numbers (``min_open``/``max_open`` make them strict).
        choices: the allowed values of a text option.
        paper: where the default comes from (e.g. "Finn et al. 2017, §5.1").
        flag: the CLI flag without dashes (default: the field name with ``-`` for ``_``).
        cli: whether the option appears at the command line and in config files.
        eval: whether ``bilevel <method> eval`` may override it (test-time options).
        secondary: for booleans, the negative flag (default ``no-`` + flag).
    """

    help: str
    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False
    choices: tuple[str, ...] | None = None
    paper: str | None = None
    flag: str | None = None
    cli: bool = True
    eval: bool = False
    secondary: str | None = None

    def describe_range(self) -> str:
        lo = "(" if self.min_open else "["
        hi = ")" if self.max_open else "]"
        a = "-inf" if self.min is None else f"{self.min:g}"
        b = "inf" if self.max is None else f"{self.max:g}"
        return f"{lo}{a}, {b}{hi}"


def option(default: Any = MISSING, *, help: str, default_factory: Callable[[], Any] | Any = MISSING,  # noqa: A002
           **declaration: Any) -> Any:
    """A dataclass field declared as an option (see :class:`Option` for the keywords)."""
    meta = {"bilevel.option": Option(help=help, **declaration)}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def declared(cls_or_obj: Any) -> list[tuple[dataclasses.Field, Option, Any]]:
    """``(field, declaration, annotated type)`` of every declared option of a config dataclass."""
    cls = cls_or_obj if isinstance(cls_or_obj, type) else type(cls_or_obj)
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        decl = f.metadata.get("bilevel.option")
        if decl is not None:
            out.append((f, decl, hints[f.name]))
    return out


def cli_fields(cls: type) -> list[tuple[dataclasses.Field, Option, Any]]:
    """The declared options shown at the command line."""
    return [d for d in declared(cls) if d[1].cli]


def field_kind(annotation: Any) -> tuple[str, bool]:
    """(kind, optional) of an annotation: kind in int/float/bool/str/strategy/schedule/dict/list."""
    from bilevel.hypergrad import Strategy

    optional = False
    origin = typing.get_origin(annotation)
    if origin in (Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        if len(args) != 1:
            raise TypeError(f"unsupported option type {annotation!r}")
        annotation = args[0]
        origin = typing.get_origin(annotation)
    if annotation == Schedule:
        return "schedule", optional
    if annotation in (int, float, bool, str):
        return annotation.__name__, optional
    if isinstance(annotation, type) and issubclass(annotation, Strategy):
        return "strategy", optional
    if origin in (dict, Mapping) or annotation is dict:
        return "dict", optional
    if origin in (list, tuple) or annotation in (list, tuple):
        return "list", optional
    raise TypeError(f"unsupported option type {annotation!r}")


# ----------------------------------------------------------------------------- checking values
def _check_number(name: str, decl: Option, value: float) -> None:
    if not math.isfinite(value):
        raise OptionError(name, f"{name} must be a finite number, got {value!r}")
    too_low = decl.min is not None and (value <= decl.min if decl.min_open else value < decl.min)
    too_high = decl.max is not None and (value >= decl.max if decl.max_open else value > decl.max)
    if too_low or too_high:
        raise OptionError(name, f"{name} must be in {decl.describe_range()}, got {value!r}")


def _check_python(name: str, kind: str, decl: Option, value: Any) -> Any:
    """Check a Python value of the declared kind; return it normalised (e.g. int -> float)."""
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise OptionError(name, f"{name} must be an integer, got {value!r}")
        _check_number(name, decl, value)
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OptionError(name, f"{name} must be a number, got {value!r}")
        _check_number(name, decl, float(value))
        return float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise OptionError(name, f"{name} must be true or false, got {value!r}")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise OptionError(name, f"{name} must be text, got {value!r}")
        if decl.choices is not None and value not in decl.choices:
            raise OptionError(name, f"{name} must be one of {', '.join(decl.choices)}; got {value!r}")
        return value
    if kind == "strategy":
        from bilevel.hypergrad import Strategy

        if isinstance(value, str):  # text goes through the one parser, and the object is kept
            from bilevel.hypergrad import from_string

            try:
                return from_string(value)
            except (TypeError, ValueError) as e:
                raise OptionError(name, str(e)) from None
        if not isinstance(value, Strategy):
            raise OptionError(name, f"{name} must be a bilevel.Strategy, got {type(value).__name__}")
        return value
    if kind == "schedule":
        if not isinstance(value, (list, tuple)):
            raise OptionError(name, f"{name} must be a list of (iteration, factor) pairs, got {value!r}")
        out = []
        for item in value:
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise OptionError(name, f"{name}: each entry must be (iteration, factor), got {item!r}")
            it, factor = item
            if isinstance(it, bool) or not isinstance(it, int) or it < 0:
                raise OptionError(name, f"{name}: iterations must be integers >= 0, got {it!r}")
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 0:
                raise OptionError(name, f"{name}: factors must be finite numbers > 0, got {factor!r} at iteration {it}")
            out.append((int(it), float(factor)))
        return out
    if kind == "dict":
        if not isinstance(value, Mapping):
            raise OptionError(name, f"{name} must be a mapping, got {type(value).__name__}")
        return dict(value)
    if kind == "list":
        if not isinstance(value, (list, tuple)):
            raise OptionError(name, f"{name} must be a list, got {type(value).__name__}")
        return list(value)
    raise AssertionError(kind)


def validate(config: Any) -> None:
    """Check every declared field of ``config`` (a dataclass instance) against its declaration.

    Normalises in place (ints given for floats become floats, tuples become lists). Call it from
    ``__post_init__``; frozen dataclasses are supported.

    Raises:
        OptionError: naming the first bad field and the rule it breaks.
    """
    for f, decl, ann in declared(config):
        kind, optional = field_kind(ann)
        value = getattr(config, f.name)
        if value is None:
            if not optional:
                raise OptionError(f.name, f"{f.name} must be set (it has no default)")
            continue
        object.__setattr__(config, f.name, _check_python(f.name, kind, decl, value))


# ----------------------------------------------------------------------------- text and files
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _parse_text(name: str, kind: str, decl: Option, value: Any) -> Any:
    """A value from the command line or a config file (text, or YAML/TOML/JSON scalars) -> Python."""
    if kind == "int":
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise OptionError(name, f"{name} must be an integer, got {value!r}") from None
        if isinstance(value, float) and not isinstance(value, bool):
            raise OptionError(name, f"{name} must be an integer, got {value!r}")
        return value
    if kind == "float":
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise OptionError(name, f"{name} must be a number, got {value!r}") from None
        return value
    if kind == "bool":
        if isinstance(value, str):
            low = value.strip().lower()
            if low in _TRUE | _FALSE:
                return low in _TRUE
            raise OptionError(name, f"{name} must be true or false, got {value!r}")
        return value
    if kind == "strategy":
        if isinstance(value, str):
            from bilevel.hypergrad import from_string

            try:
                return from_string(value)
            except (TypeError, ValueError) as e:
                raise OptionError(name, str(e)) from None
        return value
    if kind == "schedule":
        if isinstance(value, str):
            if not value.strip():
                return []
            out = []
            for part in value.split(","):
                try:
                    it, factor = part.split(":")
                    out.append((int(it), float(factor)))
                except ValueError:
                    raise OptionError(name, f"{name} must be ITER:FACTOR[,ITER:FACTOR…] (e.g. 2000:0.1,4000:0.01), "
                                            f"got {value!r}") from None
            return out
        return value
    return value


def from_text(cls: type, values: Mapping[str, Any], *, where: str = "") -> Any:
    """Build ``cls`` from values written as text or read from a file (YAML/TOML/JSON).

    Unknown keys and badly typed values raise :class:`OptionError` naming the key; ``where``
    (e.g. a file name) is added to the message. Keys may use ``-`` or ``_``.
    """
    decls = {f.name: (decl, ann) for f, decl, ann in declared(cls)}
    others = {f.name for f in dataclasses.fields(cls)} - set(decls)
    kwargs: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        if key in others:
            kwargs[key] = value
            continue
        if key not in decls:
            known = ", ".join(sorted(decls))
            raise OptionError(key, f"{where + ': ' if where else ''}unknown option {raw_key!r}; known options: {known}")
        decl, ann = decls[key]
        kind, optional = field_kind(ann)
        if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
            kwargs[key] = None
            continue
        try:
            kwargs[key] = _parse_text(key, kind, decl, value)
        except OptionError as e:
            raise OptionError(key, f"{where + ': ' if where else ''}{e}") from None
    try:
        return cls(**kwargs)
    except OptionError as e:
        raise OptionError(e.option, f"{where + ': ' if where else ''}{e}") from None


def _json_value(kind: str, value: Any) -> Any:
    if value is None:
        return None
    if kind == "strategy":
        from bilevel.hypergrad import to_string

        return to_string(value)
    if kind == "schedule":
        return [[it, factor] for it, factor in value]
    return value


def to_json(config: Any) -> dict[str, Any]:
    """The declared options of ``config`` as JSON-able values (inverse: :func:`from_json`)."""
    out = {}
    for f, _decl, ann in declared(config):
        out[f.name] = _json_value(field_kind(ann)[0], getattr(config, f.name))
    return out


def from_json(cls: type, data: Mapping[str, Any], *, where: str = "") -> Any:
    """Rebuild a config written by :func:`to_json` (the same strict conversion as :func:`from_text`)."""
    return from_text(cls, data, where=where)
