"""The ``bilevel`` command line, generated from the learners' declared options.

``bilevel <method> train|eval`` exists for every name in the learner registry
(:mod:`bilevel.registry`); its flags are generated from three declarations
(:mod:`bilevel.options`): :class:`bilevel.train.DataConfig`, :class:`bilevel.train.TrainConfig`
and the learner's ``Config``. A flag and the same key in a ``--config`` file (YAML or TOML, or a
run's ``config.yaml``) go through the same conversion and validation. ``train`` makes one library
call (:func:`bilevel.train.fit`), ``eval`` one (:func:`bilevel.train.evaluate_model`).

Exit codes: 0 success; 1 run error (training diverged, a file could not be written, a process
failed); 2 usage error (bad option or file, ``--out`` in use or holding another run);
130 interrupted (Ctrl-C: the message names the last checkpoint and the ``--resume`` command).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from bilevel import options as opts
from bilevel import registry
from bilevel._version import __version__
from bilevel.cli_common import (
    EPILOG,
    EXIT_CODES,
    apply_options,
    check_device,
    config_option,
    declared_options,
    errors_to_messages,
    given,
    usage_error,
    writable_folder,
)

# --------------------------------------------------------------------------- train / eval of one method
nproc_option = click.option(
    "--nproc", type=click.IntRange(min=1), default=1, show_default=True,
    help="Train with N processes on this machine (torchrun's launcher; gloo on CPU, NCCL with --device cuda, "
         "rank r on cuda:r); --meta-batch must be a multiple of N. Several nodes: run torchrun yourself.")


def _run_fit(name: str, target: str, options: dict[str, Any], data: dict[str, Any], train: dict[str, Any],
             resume: bool | str, command: list[str]) -> tuple[str, Any]:
    """``fit`` with its expected failures as values: ("ok", metrics), ("usage" | "error", message, option)."""
    from bilevel.train import DataConfig, TrainConfig, TrainingDiverged, fit

    try:
        registry.get_learner(name)
    except registry.UnknownLearnerError:  # a learner registered from Python in the parent: same class, by its path
        module, _, attr = target.partition(":")
        import importlib

        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        registry.register_learner(name, obj)
    cls = registry.get_learner(name).factory
    try:
        config = opts.from_json(cls.Config, options)
        return "ok", fit(name, config, opts.from_json(DataConfig, data), opts.from_json(TrainConfig, train),
                         resume=resume, command=command)
    except TrainingDiverged as e:
        return "error", (str(e), None)
    except (ValueError, TypeError, FileNotFoundError) as e:
        return "usage", (str(e), getattr(e, "option", None))


def _train_worker(*args: Any) -> tuple[str, Any]:
    """What every rank of ``--nproc N`` runs (module level: workers are started with spawn)."""
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(_run_fit)(*args)


def _launch_train(args: tuple[Any, ...], nproc: int, out: str, threads: int | None) -> tuple[str, Any]:
    """Run ``_train_worker(*args)`` on ``nproc`` local ranks; a failed rank becomes a ClickException."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from bilevel.checkpoint import checkpoint_info
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
        info = checkpoint_info(out)
        hint = (f"The last checkpoint {Path(out) / 'checkpoint.pt'} (iteration {info['iteration']}) is intact: "
                "run the same command with --resume to continue." if info else "No checkpoint was written yet.")
        raise click.ClickException("\n".join([*lines, "The other ranks were stopped (no restart).", hint])) from None


def _check_nproc(nproc: int, data: Any, cfg: Any, resume: bool) -> None:
    """Usage errors of ``--nproc`` found before any process is started."""
    from bilevel.distributed import under_launcher, world_size_mismatch

    if data.meta_batch % nproc:
        raise click.BadParameter(f"--meta-batch {data.meta_batch} is not divisible by --nproc {nproc}: each process "
                                 "takes an equal share of the meta-batch; choose a multiple of --nproc",
                                 param_hint="'--meta-batch'")
    if nproc > 1 and under_launcher():
        raise click.UsageError(f"--nproc {nproc} given but this process already runs under torchrun "
                               f"(WORLD_SIZE={os.environ['WORLD_SIZE']}); use one or the other")
    if nproc > 1 and cfg.device.startswith("cuda"):
        import torch

        if cfg.device != "cuda":
            raise click.UsageError(f"--nproc {nproc} with --device {cfg.device}: pass --device cuda (rank r uses cuda:r)")
        if torch.cuda.device_count() < nproc:
            raise click.UsageError(f"--nproc {nproc} with --device cuda needs {nproc} GPUs; "
                                   f"{torch.cuda.device_count()} visible")
    if resume and nproc > 1:  # (fit itself refuses it too, after the processes have started)
        from bilevel.checkpoint import checkpoint_info

        info = checkpoint_info(cfg.out)
        if info is not None and info["world_size"] != nproc:
            raise click.UsageError(world_size_mismatch(cfg.out, info["world_size"], nproc))


def method_group(name: str, cls: Any) -> click.Group:
    """``bilevel <name> train|eval``, generated from the learner class's declared ``Config``."""
    from bilevel.train import DataConfig, TrainConfig

    summary = cls.summary()

    @click.group(name=name, help=summary, short_help=summary.split(":")[0][:60])
    def group() -> None:
        pass

    seen: dict[str, str] = {}
    for c in (DataConfig, TrainConfig, cls.Config):
        for f, _, _ in opts.cli_fields(c):
            if f.name in seen and seen[f.name] != c.__name__:
                raise TypeError(f"option {f.name!r} of {c.__name__} collides with {seen[f.name]}")
            seen[f.name] = c.__name__

    def train(**o: Any) -> None:
        from bilevel.train import DataConfig, TrainConfig

        nproc, resume, out = o.pop("nproc"), o.pop("resume"), o.pop("out")
        command = list(click.get_current_context().meta.get("bilevel.argv", sys.argv))
        with errors_to_messages(out, command):
            data = opts.from_text(DataConfig, given(DataConfig, o))
            cfg = opts.from_text(TrainConfig, {**given(TrainConfig, o), "out": out}).resolved(cls)
            config = opts.from_text(cls.Config, given(cls.Config, o))
            _check_nproc(nproc, data, cfg, resume)
            check_device(cfg.device)
            if not resume and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
                resume = "auto"  # restarted by torchrun --max-restarts: continue from the last checkpoint if any
            args = (name, registry.get_learner(name).target, opts.to_json(config), opts.to_json(data),
                    opts.to_json(cfg), resume, command)
            status, result = _run_fit(*args) if nproc == 1 else _launch_train(args, nproc, cfg.out, cfg.threads)
            if os.environ.get("RANK", "0") != "0":  # under torchrun: rank 0 speaks for all
                sys.exit({"ok": 0, "usage": 2}.get(status, 1))
            if status == "usage":
                message, option = result
                raise usage_error(opts.OptionError(option, message) if option else ValueError(message))
            if status == "error":
                raise click.ClickException(result[0])
        _echo_result("test", result["test"], f"model: {Path(cfg.out) / 'model.pt'}")

    params = [config_option, *declared_options(DataConfig), *declared_options(TrainConfig), *declared_options(cls.Config),
              click.option("--out", type=click.Path(), required=True, help="Output folder (a new one, or the run to resume)."),
              click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint."),
              nproc_option]
    group.command("train", epilog=EPILOG,
                  help=f"Meta-train {name} and test it; writes config.yaml, model.pt, metrics.json, log.csv, "
                       "curves.png.")(apply_options(params, train))

    def evaluate(**o: Any) -> None:
        from bilevel.train import DataConfig, evaluate_model

        with errors_to_messages():
            if o["out"]:
                writable_folder(Path(o["out"]))
            if o["device"] is not None:
                check_device(o["device"])
            if o["threads"] is not None:
                import torch

                torch.set_num_threads(o["threads"])
            result = evaluate_model(o["checkpoint"], o["episodes"], data=given(DataConfig, o),
                                    overrides=given(cls.Config, o), method=name, seed=o["seed"],
                                    device=o["device"] or "cpu", progress=o["progress"] is not False)
            if o["out"]:
                from bilevel._atomic import atomic_write_json

                atomic_write_json(Path(o["out"]) / "eval.json", {"test": result})
        _echo_result(f"{result['dataset']} test", result, "")

    eval_params = [
        config_option, *declared_options(DataConfig, show_defaults=False),
        click.option("--checkpoint", type=click.Path(exists=True), required=True, help="model.pt (or its run folder)."),
        click.option("--episodes", type=click.IntRange(min=1), default=600, show_default=True),
        click.option("--seed", type=int, default=None, help="Seed of the test episodes [default: the model's]."),
        click.option("--device", default=None, help="cpu, cuda, cuda:1, … [default: cpu]."),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads."),
        click.option("--out", type=click.Path(file_okay=False), default=None, help="Also write OUT/eval.json."),
        click.option("--progress/--no-progress", default=None, help="Show a progress bar."),
        *declared_options(cls.Config, eval_only=True, show_defaults=False),
    ]
    group.command("eval", epilog=EPILOG,
                  help=f"Evaluate a trained {name} model: mean accuracy (or MSE) ± 95% CI. The dataset, ways, "
                       "shots and queries default to the model's own.")(apply_options(eval_params, evaluate))
    return group


def _echo_result(label: str, t: dict[str, Any], tail: str) -> None:
    line = f"{label} {t['metric']}: {t['mean']:.4f} ± {t['ci95']:.4f} ({t['episodes']} episodes"
    if t.get("diverged"):
        line += f"; {t['diverged']} diverged, excluded; median {t['median']:.4f}"
    click.echo(line + ")" + (f"; {tail}" if tail else ""))


class _Main(click.Group):
    """The ``bilevel`` group: fixed commands plus one group per registered learner (built on demand)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["bilevel.argv"] = ["bilevel", *args]  # the command line as typed (recorded in config.yaml)
        return super().parse_args(ctx, args)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(registry.learner_names()))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None or cmd_name not in registry.learner_names():
            return cmd
        entry = registry.get_learner(cmd_name)
        return method_group(cmd_name, entry.factory) if entry.is_meta_learner else None


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.version_option(__version__, prog_name="bilevel")
def main() -> None:
    """bilevel: bilevel optimization and meta-learning for PyTorch."""


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


def _attach_applications() -> None:
    """``bilevel hpo …`` (bilevel/hpo/cli.py) and ``bilevel bench`` (bilevel/stochastic/cli.py)."""
    from bilevel.hpo.cli import hpo
    from bilevel.stochastic.cli import bench

    main.add_command(hpo)
    main.add_command(bench)


_attach_applications()

__all__ = ["EXIT_CODES", "main", "method_group"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
