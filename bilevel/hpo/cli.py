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

The shared command-line machinery (generated options, ``--config``, errors to messages and exit
codes) is :mod:`bilevel.cli_common`; ``bilevel.cli`` attaches :data:`hpo` to the ``bilevel`` group.
"""
from __future__ import annotations

import json
from typing import Any

import click

from bilevel.cli_common import EPILOG, apply_options, config_option, declared_options, errors_to_messages
from bilevel.hpo import TASKS, run
from bilevel.options import OptionError, from_text

__all__ = ["TASK_HELP", "hpo", "task_command"]

#: one-line help of each task's command.
TASK_HELP = {
    "lr": "Tune the learning rate and momentum of SGD with momentum (forward or reverse mode).",
    "l2": "Per-feature L2 for logistic regression vs a grid search over one shared L2 weight.",
    "clean": "Data hyper-cleaning: one weight per training example, corrupted labels flagged.",
}


def task_command(task: str) -> click.Command:
    """The ``bilevel hpo TASK`` command, its options generated from ``TASKS[task]``'s config class."""
    cls = TASKS[task][0]

    def command(**given: Any) -> None:
        with errors_to_messages():
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

    help_text = f"{TASK_HELP[task]} Writes OUT/log.csv, OUT/metrics.json and PNG plots."
    decorated = apply_options([config_option, *declared_options(cls)], command)
    return click.command(task, help=help_text, short_help=TASK_HELP[task], epilog=EPILOG)(decorated)


@click.group("hpo")
def hpo() -> None:
    """Gradient-based hyperparameter optimization (Franceschi et al. 2017, 2018)."""


for _task in sorted(TASKS):
    hpo.add_command(task_command(_task))
