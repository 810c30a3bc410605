"""The ``bilevel`` command line: one click group, one subcommand group per method.

``bilevel <method> train …`` validates its options, then makes one library call
(:func:`bilevel.train.fit`); ``bilevel <method> eval --checkpoint OUT/model.pt …`` calls
:func:`bilevel.train.evaluate_model`. Options shared by every method are defined once below;
``--config FILE`` (YAML or TOML) provides defaults that flags override. Learners are imported
lazily (``bilevel`` never imports ``learners`` at module level).
"""
from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from bilevel import __version__

F = Callable[..., Any]


# --------------------------------------------------------------------------- shared helpers
def _load_config_file(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Eager ``--config`` callback: the file's keys become defaults of the command's options."""
    if value is None:
        return None
    path = Path(value)
    if not path.is_file():
        raise click.BadParameter(f"config file {value!r} does not exist", ctx=ctx, param=param)
    try:
        if path.suffix.lower() == ".toml":
            try:
                import tomllib  # type: ignore[import-not-found]
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(path.read_text())
        elif path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(path.read_text()) or {}
        else:
            raise click.BadParameter(f"config file must end in .yaml, .yml or .toml, got {path.name!r}", ctx=ctx, param=param)
    except click.BadParameter:
        raise
    except Exception as e:  # noqa: BLE001 - reported as a usage error naming the file
        raise click.BadParameter(f"cannot parse {value}: {e}", ctx=ctx, param=param) from e
    if not isinstance(data, dict):
        raise click.BadParameter(f"{value} must hold a mapping of option names to values", ctx=ctx, param=param)
    known = {p.name for p in ctx.command.params}
    normalized = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(k for k in normalized if k not in known)
    if unknown:
        raise click.BadParameter(f"{value}: unknown option(s) {unknown} for `{ctx.command_path}`", ctx=ctx, param=param)
    ctx.default_map = {**(ctx.default_map or {}), **normalized}
    return value


def _positive(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if value is not None and value <= 0:
        raise click.BadParameter(f"must be > 0, got {value}", ctx=ctx, param=param)
    return value


def _hypergrad(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    from bilevel.hypergrad import from_string

    try:
        from_string(value)
    except (TypeError, ValueError) as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None
    return value


def _schedule(ctx: click.Context, param: click.Parameter, value: str | None) -> list[tuple[int, float]]:
    if not value:
        return []
    out = []
    for part in value.split(","):
        try:
            it, factor = part.split(":")
            out.append((int(it), float(factor)))
        except ValueError:
            raise click.BadParameter(f"expected ITER:FACTOR[,ITER:FACTOR…], got {value!r}", ctx=ctx, param=param) from None
    return out


def _options(*decorators: F) -> F:
    def apply(f: F) -> F:
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


POS_INT = click.IntRange(min=1)

config_option = click.option("--config", type=click.Path(dir_okay=False), callback=_load_config_file, is_eager=True,
                             expose_value=False, help="YAML or TOML file with option defaults (flags override it).")

data_options = _options(
    click.option("--dataset", default="glyphs", show_default=True,
                 help="omniglot, mini-imagenet, tiered-imagenet, cifar-fs, fc100, sinusoid or glyphs (offline)."),
    click.option("--data-root", type=click.Path(file_okay=False), default=None, help="Folder holding the dataset files."),
    click.option("--ways", type=POS_INT, default=5, show_default=True, help="N classes per episode."),
    click.option("--shots", type=POS_INT, default=1, show_default=True, help="K support examples per class (test time)."),
    click.option("--train-shots", type=POS_INT, default=None, help="K at training time (default: --shots)."),
    click.option("--train-ways", type=POS_INT, default=None, help="N at training time (default: --ways)."),
    click.option("--queries", type=POS_INT, default=15, show_default=True, help="Q query examples per class."),
    click.option("--meta-batch", type=POS_INT, default=4, show_default=True, help="Episodes per outer step."),
    click.option("--rotations/--no-rotations", default=None, help="Omniglot: 90° rotations as new classes."),
    click.option("--split-by", type=click.Choice(["alphabet", "character"]), default=None, help="Omniglot class split."),
)

run_options = _options(
    click.option("--seed", type=int, default=0, show_default=True),
    click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, …"),
    click.option("--threads", type=POS_INT, default=None, help="torch CPU threads (default: torch's)."),
)
task_threads_option = click.option(
    "--task-threads", type=POS_INT, default=1, show_default=True,
    help="Split each meta-batch over this many CPU threads (one learner replica each).")

inner_options = _options(
    click.option("--inner-steps", type=POS_INT, default=None, help="Inner steps T at training time."),
    click.option("--inner-lr", type=float, default=None, callback=_positive, help="Inner step size (initial value if learned)."),
    click.option("--hypergrad", default=None, callback=_hypergrad,
                 help="reverse, first-order, truncated:K, checkpointed:K, forward, implicit[-cg:K], no-inner, …"),
)

train_options = _options(
    click.option("--iterations", type=POS_INT, default=1000, show_default=True, help="Outer steps."),
    click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default=None, help="Outer optimizer (default per method)."),
    click.option("--outer-lr", type=float, default=None, callback=_positive, help="Outer learning rate (default per method)."),
    click.option("--weight-decay", type=float, default=None, help="Outer weight decay (default per method)."),
    click.option("--lr-schedule", default=None, callback=_schedule, help="Piecewise factors, e.g. 2000:0.1,4000:0.01."),
    click.option("--grad-clip", type=float, default=None, callback=_positive, help="Clip the meta-gradient norm."),
    click.option("--augment/--no-augment", default=False, show_default=True, help="Crop/flip/colour-jitter training images."),
    click.option("--val-every", type=POS_INT, default=500, show_default=True),
    click.option("--val-episodes", type=POS_INT, default=100, show_default=True),
    click.option("--test-episodes", type=POS_INT, default=600, show_default=True),
    click.option("--checkpoint-every", type=POS_INT, default=100, show_default=True),
    click.option("--out", type=click.Path(file_okay=False), required=True, help="Output folder."),
    click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint."),
    click.option("--progress/--no-progress", default=True, show_default=True),
    click.option("--tensorboard/--no-tensorboard", default=True, show_default=True, help="Also log TensorBoard events."),
)


@dataclass
class Method:
    """A CLI method: learner factory, one-line description, its own options and defaults."""

    factory: str
    help: str
    options: list[F] = field(default_factory=list)
    inner: bool = True  # takes --inner-steps / --inner-lr / --hypergrad
    defaults: dict[str, Any] = field(default_factory=dict)  # optimizer/outer-lr/weight-decay defaults
    to_config: Callable[[dict[str, Any]], dict[str, Any]] = lambda o: o


def _gradient_config(o: dict[str, Any]) -> dict[str, Any]:
    """Options of the optimisation-based learners -> learner kwargs (None = learner default)."""
    keys = ("backbone", "inner_steps", "inner_lr", "eval_steps", "hypergrad")
    cfg = {k: o[k] for k in keys if o.get(k) is not None}
    if o.get("first_order"):
        if o.get("hypergrad") not in (None, "first-order"):
            raise click.UsageError("--first-order conflicts with --hypergrad " + str(o["hypergrad"]))
        cfg["hypergrad"] = "first-order"
    if o.get("filters") is not None:
        cfg["backbone_options"] = {"filters": o["filters"]}
    return cfg


backbone_option = click.option("--backbone", default=None, help="conv4, conv4-32, resnet12, mlp (default per dataset).")
filters_option = click.option("--filters", type=POS_INT, default=None, help="Conv-4 filters (64 or 32).")
eval_steps_option = click.option("--eval-steps", type=POS_INT, default=None, help="Inner steps at test time.")

METHODS: dict[str, Method] = {
    "maml": Method(
        "learners.maml:MAML", "MAML (Finn et al. 2017): a learned initialisation adapted by gradient descent.",
        [backbone_option, filters_option, eval_steps_option,
         click.option("--first-order", is_flag=True, help="First-order MAML (same as --hypergrad first-order).")],
        to_config=_gradient_config),
    "meta-sgd": Method(
        "learners.meta_sgd:MetaSGD", "Meta-SGD (Li et al. 2017): learned initialisation and elementwise step sizes.",
        [backbone_option, filters_option, eval_steps_option], to_config=_gradient_config),
    "meta-curvature": Method(
        "learners.meta_curvature:MetaCurvature",
        "Meta-Curvature (Park & Oliva 2019): gradients transformed by learned curvature matrices.",
        [backbone_option, filters_option, eval_steps_option], to_config=_gradient_config),
    "meta-lstm": Method(
        "learners.meta_lstm:MetaLSTM", "Meta-LSTM (Ravi & Larochelle 2017): an LSTM meta-learner as the inner optimiser.",
        [backbone_option, filters_option, eval_steps_option,
         click.option("--hidden-size", type=POS_INT, default=None, help="Hidden units of the first LSTM layer.")],
        to_config=lambda o: {**_gradient_config(o), **({"hidden_size": o["hidden_size"]} if o.get("hidden_size") else {})}),
    "hyper-repr": Method(
        "learners.hyper_repr:HyperRepr",
        "Hyper-Representation (Franceschi et al. 2018): a meta-learned representation with logistic-regression heads.",
        [backbone_option, filters_option, eval_steps_option,
         click.option("--variant", type=click.Choice(["bilevel", "approx", "classic"]), default=None,
                      help="bilevel (default), approx (NoInner) or classic (joint multitask), App. A.")],
        to_config=lambda o: {**_gradient_config(o), **({"variant": o["variant"]} if o.get("variant") else {})}),
    "metaoptnet": Method(
        "learners.metaoptnet:MetaOptNet", "MetaOptNet (Lee et al. 2019): differentiable convex heads on a backbone.",
        [backbone_option, filters_option,
         click.option("--head", type=click.Choice(["svm", "ridge", "r2d2", "proto"]), default="svm", show_default=True),
         click.option("--C", "C", type=float, default=None, callback=_positive, help="SVM regularisation C."),
         click.option("--lam", type=float, default=None, callback=_positive, help="Ridge/R2D2 regularisation λ."),
         click.option("--label-smoothing", type=click.FloatRange(0.0, 1.0, max_open=True), default=None),
         click.option("--max-iter", type=POS_INT, default=None, help="QP iterations at training time."),
         click.option("--eval-max-iter", type=POS_INT, default=None, help="QP iterations at test time (paper: 3).")],
        inner=False, defaults={"optimizer": "sgd", "outer_lr": 0.1, "weight_decay": 5e-4},
        to_config=lambda o: {k: o[k] for k in ("backbone", "head", "C", "lam", "label_smoothing", "max_iter", "eval_max_iter")
                             if o.get(k) is not None} | ({"backbone_options": {"filters": o["filters"]}} if o.get("filters") else {})),
}


def _data_config(o: dict[str, Any]) -> Any:
    from bilevel.train import DataConfig

    options: dict[str, Any] = {}
    if o.get("rotations") is not None:
        options["rotations"] = o["rotations"]
    if o.get("split_by") is not None:
        options["split_by"] = o["split_by"]
    if options and o["dataset"] != "omniglot":
        raise click.UsageError("--rotations/--split-by apply to --dataset omniglot only")
    return DataConfig(dataset=o["dataset"], data_root=o["data_root"], ways=o["ways"], shots=o["shots"],
                      queries=o["queries"], train_shots=o["train_shots"], train_ways=o["train_ways"],
                      meta_batch=o["meta_batch"], augment=o.get("augment", False), options=options)


def _library_errors() -> tuple[type[BaseException], ...]:
    from bilevel.data import DatasetNotFoundError

    return (DatasetNotFoundError, FileNotFoundError, FileExistsError, ValueError, TypeError)


# --------------------------------------------------------------------------- data-parallel training
nproc_option = click.option(
    "--nproc", type=POS_INT, default=1, show_default=True,
    help="Train with N processes on this machine (torchrun's launcher; gloo on CPU, NCCL with --device cuda, "
         "rank r on cuda:r); --meta-batch must be a multiple of N. Several nodes: run torchrun yourself.")


def _run_fit(factory: str, learner_config: dict[str, Any], data: Any, cfg: Any, resume: bool | str) -> tuple[str, Any]:
    """``fit`` with its expected failures as values: ("ok", metrics), ("usage" | "error", message)."""
    from bilevel.train import fit

    try:
        return "ok", fit(factory, learner_config, data, cfg, resume=resume)
    except _library_errors() as e:
        return "usage", str(e)
    except FloatingPointError as e:
        return "error", str(e)


def _train_worker(*args: Any) -> tuple[str, Any]:
    """What every rank of ``--nproc N`` runs (module level: workers are started with spawn)."""
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(_run_fit)(*args)


def _launch_train(args: tuple[Any, ...], nproc: int, out: str, threads: int | None) -> tuple[str, Any]:
    """Run ``_train_worker(*args)`` on ``nproc`` local ranks; a failed rank becomes a ClickException."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from bilevel.distributed import launch

    try:
        return launch(_train_worker, args, nproc=nproc, threads=threads)
    except ChildFailedError as e:
        lines = []
        for rank, f in sorted(e.failures.items()):
            if f.exitcode < 0:
                lines.append(f"rank {rank} (pid {f.pid}) was killed by {f.signal_name()}")
            else:
                msg = f.message.get("message", f.message) if isinstance(f.message, dict) else f.message
                trace = f.message.get("extraInfo", {}).get("py_callstack", "") if isinstance(f.message, dict) else ""
                lines.append(f"rank {rank} (pid {f.pid}) exited with code {f.exitcode}: {msg}\n{trace}".rstrip())
        from bilevel.distributed import checkpoint_info

        info = checkpoint_info(out)
        hint = (f"The last checkpoint {Path(out) / 'checkpoint.pt'} (iteration {info['iteration']}) is intact: "
                "run the same command with --resume to continue." if info else "No checkpoint was written yet.")
        raise click.ClickException("\n".join([*lines, "The other ranks were stopped (no restart).", hint])) from None


def _check_nproc(nproc: int, o: dict[str, Any]) -> None:
    """Usage errors of ``--nproc`` found before any process is started."""
    if o["meta_batch"] % nproc:
        raise click.UsageError(f"--meta-batch {o['meta_batch']} is not divisible by --nproc {nproc}: each process "
                               "takes an equal share of the meta-batch; choose a multiple of --nproc")
    from bilevel.distributed import under_launcher

    if nproc > 1 and under_launcher():
        raise click.UsageError(f"--nproc {nproc} given but this process already runs under torchrun "
                               f"(WORLD_SIZE={os.environ['WORLD_SIZE']}); use one or the other")
    if nproc > 1 and o["device"].startswith("cuda"):
        import torch

        if o["device"] != "cuda":
            raise click.UsageError(f"--nproc {nproc} with --device {o['device']}: pass --device cuda "
                                   "(rank r uses cuda:r)")
        if torch.cuda.device_count() < nproc:
            raise click.UsageError(f"--nproc {nproc} with --device cuda needs {nproc} GPUs; "
                                   f"{torch.cuda.device_count()} visible")
    if o["resume"] and nproc > 1:  # (fit itself refuses it too, after the processes have started)
        from bilevel.distributed import checkpoint_info, world_size_mismatch

        info = checkpoint_info(o["out"])
        if info is not None and info["world_size"] != nproc:
            raise click.UsageError(world_size_mismatch(o["out"], info["world_size"], nproc))


def _make_method_group(name: str, m: Method) -> click.Group:
    @click.group(name=name, help=m.help, short_help=m.help.split(":")[0])
    def group() -> None:
        pass

    def train(**o: Any) -> None:
        from bilevel.train import TrainConfig

        nproc = o.pop("nproc")
        _check_nproc(nproc, o)
        data = _data_config(o)
        learner_config = m.to_config(o)
        cfg = TrainConfig(
            iterations=o["iterations"], optimizer=o["optimizer"] or m.defaults.get("optimizer", "adam"),
            lr=o["outer_lr"] or m.defaults.get("outer_lr", 1e-3),
            weight_decay=o["weight_decay"] if o["weight_decay"] is not None else m.defaults.get("weight_decay", 0.0),
            lr_schedule=o["lr_schedule"], grad_clip=o["grad_clip"], val_every=o["val_every"],
            val_episodes=o["val_episodes"], test_episodes=o["test_episodes"], checkpoint_every=o["checkpoint_every"],
            seed=o["seed"], device=o["device"], out=o["out"], progress=o["progress"], threads=o["threads"],
            tensorboard=o["tensorboard"], task_threads=o["task_threads"])
        resume: bool | str = o["resume"]
        if not resume and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
            resume = "auto"  # restarted by torchrun --max-restarts: continue from the last checkpoint if any
        args = (m.factory, learner_config, data, cfg, resume)
        status, metrics = _run_fit(*args) if nproc == 1 else _launch_train(args, nproc, cfg.out, cfg.threads)
        if os.environ.get("RANK", "0") != "0":  # under torchrun: rank 0 speaks for all
            sys.exit({"ok": 0, "usage": 2}.get(status, 1))
        if status == "usage":
            raise click.UsageError(metrics)
        if status == "error":
            raise click.ClickException(metrics)
        t = metrics["test"]
        click.echo(f"test {t['metric']}: {t['mean']:.4f} ± {t['ci95']:.4f} ({t['episodes']} episodes); "
                   f"model: {Path(cfg.out) / 'model.pt'}")

    params = [config_option, data_options, run_options, train_options, nproc_option, task_threads_option, *m.options]
    if m.inner:
        params.append(inner_options)
    for dec in reversed(params):
        train = dec(train)
    group.command("train", help=f"Meta-train {name} and test it; writes model.pt, metrics.json, log.csv, curves.png.")(train)

    def evaluate(**o: Any) -> None:
        from bilevel.train import evaluate_model

        data = _data_config(o)
        overrides = {}
        if o.get("eval_steps") is not None:
            overrides["eval_steps"] = o["eval_steps"]
        if o.get("eval_max_iter") is not None:
            overrides["eval_max_iter"] = o["eval_max_iter"]
        try:
            result = evaluate_model(o["checkpoint"], data, o["episodes"], seed=o["seed"], device=o["device"],
                                    overrides=overrides or None, progress=o["progress"])
        except _library_errors() as e:
            raise click.UsageError(str(e)) from None
        click.echo(f"{result['metric']}: {result['mean']:.4f} ± {result['ci95']:.4f} ({result['episodes']} episodes)")
        if o["out"]:
            out = Path(o["out"])
            out.mkdir(parents=True, exist_ok=True)
            (out / "eval.json").write_text(json.dumps({"test": result}, indent=2))

    eval_params = [
        config_option, data_options, run_options,
        click.option("--checkpoint", type=click.Path(exists=True), required=True, help="model.pt (or its run folder)."),
        click.option("--episodes", type=POS_INT, default=600, show_default=True),
        click.option("--out", type=click.Path(file_okay=False), default=None, help="Also write OUT/eval.json."),
        click.option("--progress/--no-progress", default=True, show_default=True),
    ]
    if m.inner:
        eval_params.append(click.option("--eval-steps", type=POS_INT, default=None, help="Inner steps at test time."))
    if name == "metaoptnet":
        eval_params.append(click.option("--eval-max-iter", type=POS_INT, default=None, help="QP iterations at test time."))
    for dec in reversed(eval_params):
        evaluate = dec(evaluate)
    group.command("eval", help=f"Evaluate a trained {name} model: mean accuracy (or MSE) ± 95% CI.")(evaluate)
    return group


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bilevel")
def main() -> None:
    """bilevel: bilevel optimization and meta-learning for PyTorch."""


for _name, _method in METHODS.items():
    main.add_command(_make_method_group(_name, _method))


@main.command("plot")
@click.argument("out", type=click.Path(exists=True, file_okay=False))
def plot(out: str) -> None:
    """Write OUT/curves.png from the run's log.csv."""
    from bilevel.plot import plot_run

    try:
        path = plot_run(out)
    except (FileNotFoundError, ValueError) as e:
        raise click.UsageError(str(e)) from None
    click.echo(str(path))


__all__ = ["METHODS", "main"]


# ---- hpo (issue 6): `bilevel hpo lr|l2|clean` -------------------------------------------------
# Thin wrappers: options -> bilevel.hpo.make_config -> bilevel.hpo.run. Range checks live in the
# library configs; their OptionError becomes a usage error on the option it names.
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

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
