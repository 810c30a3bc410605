"""The ``bilevel`` command line: one click group; methods add subcommands."""
from __future__ import annotations

import click

from bilevel import __version__


@click.group()
@click.version_option(__version__, prog_name="bilevel")
def main() -> None:
    """bilevel: bilevel optimization and meta-learning for PyTorch."""


__all__ = ["main"]


# ---- hpo (issue 6): `bilevel hpo lr|l2|clean` -------------------------------------------------
# Thin wrappers: options -> bilevel.hpo.make_config -> bilevel.hpo.run. Range checks live in the
# library configs; their OptionError becomes a usage error on the option it names.
import functools  # noqa: E402
import json  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

_HPO_STRATEGIES = ("forward", "reverse", "checkpointed", "truncated", "implicit")


def _hpo_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options every `bilevel hpo` task shares (None = the task's default)."""
    options = [
        click.option("--dataset", type=click.Choice(["digits", "mnist"]), default=None,
                     help="digits (scikit-learn, offline) or mnist; default: mnist when --data-root is given, else digits."),
        click.option("--data-root", type=click.Path(path_type=str), default=None,
                     help="Folder with mnist10k.npz or torchvision's MNIST/raw (or the .npz file itself)."),
        click.option("--download", is_flag=True, default=False, help="Let torchvision download MNIST into --data-root."),
        click.option("--out", type=click.Path(file_okay=False, path_type=str), default=None,
                     help="Output folder for log.csv, metrics.json and PNGs [default: runs/hpo-TASK]."),
        click.option("--seed", type=int, default=None, help="Seed of the split, label noise, inits and mini-batches [0]."),
        click.option("--device", type=str, default=None, help="Torch device [cpu]."),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="torch.set_num_threads for this run [torch's default]."),
        click.option("--hyper-steps", type=int, default=None, help="Hyper-iterations (updates of the hyperparameters)."),
        click.option("--inner-steps", type=int, default=None, help="Inner steps T per hypergradient (per segment with --online)."),
        click.option("--hypergrad", type=click.Choice(_HPO_STRATEGIES), default=None, help="Hypergradient strategy."),
        click.option("--hyper-lr", type=float, default=None, help="Adam step size on the hyperparameters."),
        click.option("--n-train", type=int, default=None, help="Training-set size."),
        click.option("--n-val", type=int, default=None, help="Validation-set size (>= 1)."),
        click.option("--n-test", type=int, default=None, help="Test-set size."),
        click.option("--truncate", type=int, default=None, help="k of Truncated(k) with --hypergrad truncated."),
        click.option("--cg-iters", type=int, default=None, help="CG iterations with --hypergrad implicit."),
        click.option("--progress/--no-progress", default=True, help="Show a progress bar."),
    ]
    return functools.reduce(lambda f, option: option(f), reversed(options), fn)


def _convex_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options of the linear-model tasks (l2, clean): the inner heavy-ball fit and its refits."""
    options = [
        click.option("--inner-lr", type=float, default=None, help="Inner step size η."),
        click.option("--inner-momentum", type=float, default=None, help="Inner momentum μ."),
        click.option("--eval-steps", type=int, default=None, help="Inner steps of the refits the reported numbers come from."),
    ]
    return functools.reduce(lambda f, option: option(f), reversed(options), fn)


def _hpo_run(task: str, options: dict[str, Any]) -> None:
    from bilevel import hpo  # lazy: `bilevel --help` stays fast

    threads = options.pop("threads", None)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    if options.get("out") is None:
        options["out"] = f"runs/hpo-{task}"
    try:
        metrics = hpo.run(hpo.make_config(task, **options))
    except hpo.OptionError as e:
        raise click.BadParameter(str(e), param_hint=f"'--{e.option.replace('_', '-')}'") from None
    except ValueError as e:  # e.g. a diverging inner run: a message, not a traceback
        raise click.ClickException(str(e)) from None
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    click.echo(json.dumps(scalars, indent=2))
    click.echo(f"wrote {options['out']}/metrics.json")


@main.group()
def hpo() -> None:
    """Gradient-based hyperparameter optimization (Franceschi et al. 2017, 2018)."""


@hpo.command("lr")
@_hpo_options
@click.option("--lr", type=float, default=None, help="Initial learning rate η [0.01].")
@click.option("--momentum", type=float, default=None, help="Initial momentum μ in (0, 1) [0.5].")
@click.option("--schedule", is_flag=True, default=False, help="Tune one learning rate per inner step.")
@click.option("--online", is_flag=True, default=False, help="Real-time HO: update λ every --inner-steps within one run.")
@click.option("--batch-size", type=int, default=None, help="Mini-batch size [100].")
@click.option("--hidden", type=int, default=None, help="Hidden width of the MLP [64].")
def hpo_lr(**options: Any) -> None:
    """Tune the learning rate and momentum of SGD with momentum (forward or reverse mode)."""
    _hpo_run("lr", options)


@hpo.command("l2")
@_hpo_options
@_convex_options
@click.option("--grid-points", type=int, default=None, help="Shared-L2 grid size [13].")
@click.option("--grid-min", type=float, default=None, help="log10 of the smallest grid value [-6].")
@click.option("--grid-max", type=float, default=None, help="log10 of the largest grid value [0].")
@click.option("--per", type=click.Choice(["feature", "weight"]), default=None, help="One L2 weight per feature or per weight entry.")
def hpo_l2(**options: Any) -> None:
    """Per-feature L2 for logistic regression vs a grid search over one shared L2 weight."""
    _hpo_run("l2", options)


@hpo.command("clean")
@_hpo_options
@_convex_options
@click.option("--corrupt-fraction", type=float, default=None, help="Share of training labels flipped, in [0, 1) [0.5].")
@click.option("--weights", type=click.Choice(["sigmoid", "projection"]), default=None, help="How weights stay in [0, 1].")
@click.option("--reg", type=float, default=None, help="Inner L2 weight on W [1e-3].")
@click.option("--threshold", type=float, default=None, help="Flag examples whose weight is below this [0.5].")
def hpo_clean(**options: Any) -> None:
    """Data hyper-cleaning: one weight per training example, corrupted labels flagged."""
    _hpo_run("clean", options)


__all__ += ["hpo"]
# ---- end hpo ------------------------------------------------------------------------------------
