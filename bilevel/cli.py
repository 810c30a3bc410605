"""The ``bilevel`` command line: one click group; methods add subcommands."""
from __future__ import annotations

import click

from bilevel import __version__


@click.group()
@click.version_option(__version__, prog_name="bilevel")
def main() -> None:
    """bilevel: bilevel optimization and meta-learning for PyTorch."""


__all__ = ["main"]
