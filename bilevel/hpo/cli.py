"""``bilevel hpo lr|l2|clean``: one command per task, generated from the task's declared options.

Each command's flags are generated from its config dataclass (:data:`bilevel.hpo.TASKS`) by
:func:`bilevel.cli.declared_options`, and ``--config FILE`` (YAML or TOML) goes through the same
conversion and validation (:func:`bilevel.options.from_text`): ``--hypergrad truncated:4`` and
``hypergrad: truncated:4`` in a file are parsed by the one parser,
:func:`bilevel.hypergrad.from_string`, and ``hyper_steps: 5.7`` is refused in both. A command
makes one library call, :func:`bilevel.hpo.run`.

Exit codes (as every ``bilevel`` command): 0 success; 1 run error (e.g. the inner run diverged, a
file could not be written); 2 usage error (a bad option, naming it; data not found); 130
interrupted.

The commands are built when the group is used, because they reuse the option machinery of
:mod:`bilevel.cli`, which itself attaches this group (``main.add_command(hpo)``): importing
:mod:`bilevel.cli` lazily here keeps the two modules free of an import cycle.
"""
from __future__ import annotations

import json
from typing import Any

import click

from bilevel.hpo import TASKS, run
from bilevel.options import OptionError, from_text

__all__ = ["hpo", "task_command"]

#: one-line help of each task's command.
TASK_HELP = {
    "lr": "Tune the learning rate and momentum of SGD with momentum (forward or reverse mode).",
    "l2": "Per-feature L2 for logistic regression vs a grid search over one shared L2 weight.",
    "clean": "Data hyper-cleaning: one weight per training example, corrupted labels flagged.",
}


def task_command(task: str) -> click.Command:
    """The ``bilevel hpo TASK`` command, its options generated from ``TASKS[task]``'s config class."""
    from bilevel.cli import EPILOG, _apply, _errors_to_messages, _given, config_option, declared_options

    cls = TASKS[task][0]

    def command(**given: Any) -> None:
        with _errors_to_messages():
            config = from_text(cls, {"out": f"runs/hpo-{task}", **_given(cls, given)})
            try:
                metrics = run(config)
            except OptionError:  # e.g. --data-root holds no MNIST: a usage error naming the option
                raise
            except ValueError as e:  # e.g. a diverging inner run: a message and exit code 1, not a traceback
                raise click.ClickException(str(e)) from None
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
        click.echo(json.dumps(scalars, indent=2))
        click.echo(f"wrote {config.out}/metrics.json")

    help_text = (f"{TASK_HELP.get(task, cls.__doc__.splitlines()[0] if cls.__doc__ else task)} Writes OUT/log.csv, "
                 "OUT/metrics.json and PNG plots.")
    return click.command(task, help=help_text, short_help=TASK_HELP.get(task), epilog=EPILOG)(
        _apply([config_option, *declared_options(cls)], command))


class _TaskGroup(click.Group):
    """The ``hpo`` group: one command per task of :data:`bilevel.hpo.TASKS`, built on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(TASKS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return task_command(cmd_name) if cmd_name in TASKS else None


@click.group("hpo", cls=_TaskGroup)
def hpo() -> None:
    """Gradient-based hyperparameter optimization (Franceschi et al. 2017, 2018)."""
