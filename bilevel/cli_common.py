"""What every ``bilevel`` command shares: options generated from declarations, ``--config`` files,
device and output checks, and one mapping from library errors to messages and exit codes.

Exit codes (:data:`EXIT_CODES`): 0 success; 1 run error (training diverged, a file could not be
written, a process failed); 2 usage error (bad option or file, ``--out`` in use or holding
another run); 130 interrupted (Ctrl-C: the message names the last checkpoint and the ``--resume``
command).
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from bilevel import options as opts

__all__ = ["EPILOG", "EXIT_CODES", "DeclaredType", "apply_options", "check_device", "config_option", "declared_options",
           "errors_to_messages", "given", "usage_error", "writable_folder"]

F = Callable[..., Any]

EXIT_CODES = {0: "success", 1: "run error (diverged training, a failed write or process)",
              2: "usage error (bad option, file or --out)", 130: "interrupted (Ctrl-C)"}
EPILOG = "Exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items()) + "."


# --------------------------------------------------------------------------- options from declarations
class DeclaredType(click.ParamType):
    """A click type that converts with the option's declaration (same rules as config files)."""

    def __init__(self, name: str, kind: str, decl: opts.Option) -> None:
        self.name = {"strategy": "STRATEGY", "schedule": "ITER:FACTOR,…"}.get(kind, kind.upper())
        self.field, self.kind, self.decl = name, kind, decl

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return opts._check_python(self.field, self.kind, self.decl, opts._parse_text(self.field, self.kind, self.decl, value))
        except opts.OptionError as e:
            self.fail(str(e), param, ctx)


def _flag(field_name: str, decl: opts.Option) -> str:
    return decl.flag or field_name.replace("_", "-")


def _default_text(f: dataclasses.Field, kind: str) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return ""
    if value is None or value == []:
        return ""
    return f" [default: {opts._json_value(kind, value)}]"


def declared_options(cls: type, *, eval_only: bool = False, show_defaults: bool = True) -> list[F]:
    """One click option per declared CLI field of ``cls`` (default ``None`` = not given)."""
    out = []
    for f, decl, ann in opts.cli_fields(cls):
        if eval_only and not decl.eval:
            continue
        kind, _ = field_kind(ann)
        flag = _flag(f.name, decl)
        help_text = decl.help + (_default_text(f, kind) if show_defaults else "")
        if kind == "bool":
            neg = decl.secondary or f"no-{flag}"
            out.append(click.option(f"--{flag}/--{neg}", f.name, default=None, help=help_text))
        else:
            metavar = "|".join(decl.choices) if decl.choices else None
            out.append(click.option(f"--{flag}", f.name, type=DeclaredType(f.name, kind, decl), default=None,
                                    metavar=metavar, help=help_text))
    return out


def field_kind(annotation: Any) -> tuple[str, bool]:
    return opts.field_kind(annotation)


def given(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f, _, _ in opts.declared(cls)}
    return {k: v for k, v in values.items() if k in names and v is not None}


def apply_options(fns: list[F], f: F) -> F:
    for dec in reversed(fns):
        f = dec(f)
    return f


# --------------------------------------------------------------------------- --config files
def _read_config_file(path: Path) -> Any:
    if path.suffix.lower() == ".toml":
        try:
            import tomllib  # type: ignore[import-not-found]
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        return tomllib.loads(path.read_text())
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(path.read_text())
    raise click.BadParameter(f"config file must end in .yaml, .yml or .toml, got {path.name!r}")


def _load_config_file(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Eager ``--config`` callback: the file's keys become defaults of the command's options."""
    if value is None:
        return None
    path = Path(value)
    if not path.is_file():
        raise click.BadParameter(f"config file {value!r} does not exist", ctx=ctx, param=param)
    try:
        data = _read_config_file(path)
    except click.BadParameter as e:
        e.ctx, e.param = ctx, param
        raise
    except Exception as e:  # noqa: BLE001 - reported as a usage error naming the file
        raise click.BadParameter(f"cannot parse {value}: {e}", ctx=ctx, param=param) from e
    if data is None or data == {}:
        raise click.BadParameter(f"{value} is empty: it sets no option. Remove --config or put `option: value` lines in it",
                                 ctx=ctx, param=param)
    if not isinstance(data, dict):
        raise click.BadParameter(f"{value} must hold a mapping of option names to values", ctx=ctx, param=param)
    method = (ctx.parent.info_name if ctx.parent is not None else None) or ""
    if "options" in data and "method" in data:  # a run's config.yaml
        if data["method"] != method:
            raise click.BadParameter(f"{value} is the configuration of a {data['method']!r} run; use "
                                     f"`bilevel {data['method']} {ctx.info_name} --config {value}`", ctx=ctx, param=param)
        if not isinstance(data["options"], dict):
            raise click.BadParameter(f"{value}: 'options' must be a mapping", ctx=ctx, param=param)
        data = data["options"]
    known = {p.name for p in ctx.command.params if p.name not in ("config",)}
    normalized = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(k for k in normalized if k not in known)
    if unknown:
        raise click.BadParameter(f"{value}: unknown option(s) {unknown} for `{ctx.command_path}`", ctx=ctx, param=param)
    ctx.default_map = {**(ctx.default_map or {}), **normalized}
    return value


config_option = click.option("--config", type=click.Path(dir_okay=False), callback=_load_config_file, is_eager=True,
                             expose_value=False, help="YAML or TOML file with option values (a run's config.yaml "
                             "repeats that run); flags override it.")


# --------------------------------------------------------------------------- errors -> messages and exit codes
def usage_error(e: BaseException) -> click.ClickException:
    option = getattr(e, "option", None)
    if option:
        return click.BadParameter(str(e), param_hint=f"'--{option.replace('_', '-')}'")
    return click.UsageError(str(e))


@contextmanager
def errors_to_messages(out: str | None = None, command: list[str] | None = None) -> Iterator[None]:
    """Library errors become one message and a documented exit code (see the module docstring)."""
    from bilevel.checkpoint import CheckpointError
    from bilevel.data import DatasetNotFoundError
    from bilevel.io import ModelFileError
    from bilevel.registry import UnknownLearnerError
    from bilevel.run_folder import RunFolderError
    from bilevel.train import TrainingDiverged

    try:
        yield
    except TrainingDiverged as e:
        raise click.ClickException(str(e)) from None
    except (opts.OptionError, RunFolderError, CheckpointError, ModelFileError, UnknownLearnerError,
            DatasetNotFoundError, FileNotFoundError, ValueError, TypeError) as e:
        raise usage_error(e) from None
    except OSError as e:
        where = f"cannot write or read {e.filename}" if getattr(e, "filename", None) else "cannot write or read a file"
        raise click.ClickException(f"{where}: {e.strerror or e}. Free space or fix the permissions. "
                                   + (_resume_hint(out, command) if out else "Then run the same command again.")) from None
    except KeyboardInterrupt:
        click.echo("Interrupted. " + (_resume_hint(out, command) if out else ""), err=True)
        sys.exit(130)


def _resume_hint(out: str, command: list[str] | None) -> str:
    """Where the run can continue from: the last checkpoint and the exact --resume command (or that there is none)."""
    from bilevel.checkpoint import checkpoint_info

    try:
        info = checkpoint_info(out)
    except (ValueError, OSError):
        info = None
    if not info:
        return "No checkpoint was written yet: run the same command again."
    cmd = list(command or sys.argv)
    resume_cmd = shlex.join(["bilevel", *cmd[1:], *([] if "--resume" in cmd else ["--resume"])])
    return (f"The last checkpoint is {Path(out) / 'checkpoint.pt'} (iteration {info['iteration']}); continue with:\n"
            f"  {resume_cmd}")


def writable_folder(path: Path) -> None:
    """Create ``path`` now (before any work) or raise a usage error on ``--out``."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise click.BadParameter(f"{path} cannot be created ({e.strerror or e}); choose a folder you can write to",
                                 param_hint="'--out'") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise click.BadParameter(f"{path} is not writable; choose a folder you can write to", param_hint="'--out'")


def check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise click.BadParameter(f"{device!r} is not a torch device; use cpu, cuda or cuda:N",
                                 param_hint="'--device'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter(f"{device!r}: CUDA is not available on this machine (torch {torch.__version__}, "
                                 f"{'CPU build' if torch.version.cuda is None else 'no GPU visible'}); use --device cpu",
                                 param_hint="'--device'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise click.BadParameter(f"{device!r}: only {torch.cuda.device_count()} GPU(s) visible", param_hint="'--device'")
    if dev.type not in ("cpu", "cuda"):
        raise click.BadParameter(f"{device!r}: bilevel runs on cpu or cuda", param_hint="'--device'")
