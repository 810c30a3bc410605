"""``bilevel hpo lr|l2|clean``: one command per task, generated from the task's declared options.

Each command's flags are generated from its config dataclass (:data:`bilevel.hpo.TASKS`) by the
same machinery as the learners' commands (``declared_options``), and ``--config FILE`` (YAML or
TOML) goes through the same conversion and validation (:func:`bilevel.options.from_text`):
``--hypergrad truncated:4`` and ``hypergrad: truncated:4`` in a file are parsed by the one
parser, :func:`bilevel.hypergrad.from_string`, and ``hyper_steps: 5.7`` is refused in both. A
command makes one library call, :func:`bilevel.hpo.run`.

Exit codes (as every ``bilevel`` command): 0 success; 1 run error (e.g. the inner run diverged, a
file could not be written); 2 usage error (a bad option, naming it; data not found); 130
interrupted.

The command line (:mod:`bilevel.cli`) sits above ``bilevel.hpo`` in the import layers, so this
module does not import it: :func:`hpo_group` receives the command line's option machinery
(:class:`CLITools`) and ``bilevel.cli`` attaches the result (``main.add_command(hpo_group(...))``).
"""
from __future__ import annotations

import functools
import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import click

from bilevel.hpo import TASKS, run
from bilevel.options import OptionError, from_text

__all__ = ["TASK_HELP", "CLITools", "hpo_group", "task_command"]

#: one-line help of each task's command.
TASK_HELP = {
    "lr": "Tune the learning rate and momentum of SGD with momentum (forward or reverse mode).",
    "l2": "Per-feature L2 for logistic regression vs a grid search over one shared L2 weight.",
    "clean": "Data hyper-cleaning: one weight per training example, corrupted labels flagged.",
}


@dataclass(frozen=True)
class CLITools:
    """The command line's option machinery (:mod:`bilevel.cli` passes its own).

    Attributes:
        declared_options: ``cls -> [click option decorator]``, one per declared CLI field.
        config_option: the ``--config FILE`` option (file keys become the options' defaults).
        errors_to_messages: ``() -> context manager`` turning library errors into a message and exit code.
        epilog: text shown under every command's help (the exit codes).
    """

    declared_options: Callable[[type], list[Callable[..., Any]]]
    config_option: Callable[..., Any]
    errors_to_messages: Callable[[], AbstractContextManager[None]]
    epilog: str = ""


def task_command(task: str, tools: CLITools) -> click.Command:
    """The ``bilevel hpo TASK`` command, its options generated from ``TASKS[task]``'s config class."""
    cls = TASKS[task][0]

    def command(**given: Any) -> None:
        with tools.errors_to_messages():
            config = from_text(cls, {"out": f"runs/hpo-{task}", **{k: v for k, v in given.items() if v is not None}})
            try:
                metrics = run(config)
            except OptionError:  # e.g. --data-root holds no MNIST: a usage error naming the option
                raise
            except ValueError as e:  # e.g. a diverging inner run: a message and exit code 1, not a traceback
                raise click.ClickException(str(e)) from None
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
        click.echo(json.dumps(scalars, indent=2))
        click.echo(f"wrote {config.out}/metrics.json")

    options = [tools.config_option, *tools.declared_options(cls)]
    help_text = f"{TASK_HELP[task]} Writes OUT/log.csv, OUT/metrics.json and PNG plots."
    decorated = functools.reduce(lambda f, option: option(f), reversed(options), command)
    return click.command(task, help=help_text, short_help=TASK_HELP[task], epilog=tools.epilog)(decorated)


def hpo_group(tools: CLITools) -> click.Group:
    """The ``bilevel hpo`` group: one command per task of :data:`bilevel.hpo.TASKS`."""

    @click.group("hpo")
    def hpo() -> None:
        """Gradient-based hyperparameter optimization (Franceschi et al. 2017, 2018)."""

    for task in sorted(TASKS):
        hpo.add_command(task_command(task, tools))
    return hpo
