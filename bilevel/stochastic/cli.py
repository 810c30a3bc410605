"""``bilevel bench``: run stochastic bilevel solvers on benchmark_bilevel's problems, plot metric vs time.

Attach to the main CLI with ``main.add_command(bench)`` (``from bilevel.stochastic.cli import bench``).
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import click
import torch

from bilevel.stochastic.problems import PROBLEMS, BenchProblem
from bilevel.stochastic.runner import Trace, run
from bilevel.stochastic.solvers import SOLVERS

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def make_problem(name: str, *, data_root: str | None, dtype: torch.dtype, device: str, seed: int | None) -> BenchProblem:
    """Build a problem by name with the CLI's options (``data_root`` needed by MNIST problems)."""
    kw: dict[str, Any] = {"dtype": dtype, "device": device}
    if seed is not None:
        kw["seed"] = seed
    if name == "data_cleaning":
        if data_root is None:
            raise click.UsageError("--problem data_cleaning needs --data-root (a folder holding mnist10k.npz)", None)
        kw["data_root"] = data_root
    elif name == "l2_logistic" and data_root is not None:
        kw.update(dataset="mnist", data_root=data_root)
    return PROBLEMS[name](**kw)


def write_results(out: Path, bench: BenchProblem, traces: list[Trace], targets: tuple[float, ...]) -> dict[str, Any]:
    """Write ``trace.csv``, ``summary.json`` and ``bench.png`` into ``out`` (atomically); return the summary."""
    out.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for t in traces for r in t.rows for k in r})
    tmp = out / "trace.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["solver", *keys])
        w.writeheader()
        for t in traces:
            for r in t.rows:
                w.writerow({"solver": t.solver, **r})
    os.replace(tmp, out / "trace.csv")
    summary = {
        "problem": bench.name, "value": bench.value_name,
        "solvers": {t.solver: {"stopped": t.stopped, "final": t.rows[-1]["value"], "steps": t.rows[-1]["step"],
                               "time": t.rows[-1]["time"],
                               **{f"time_to_{g:g}": (None if math.isinf(t.time_to(g)) else t.time_to(g)) for g in targets}}
                    for t in traces},
    }
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out / "summary.json")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in traces:
        ax.plot([r["time"] for r in t.rows], [max(r["value"], 1e-300) for r in t.rows], label=t.solver.split("(")[0], lw=1.5)
    ax.set(xlabel="time (s, solver only)", ylabel=bench.value_name, title=f"{bench.name}")
    if bench.value_name.startswith("|grad"):
        ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    tmp = out / "bench.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out / "bench.png")
    return summary


@click.command("bench")
@click.option("--problem", type=click.Choice(sorted(PROBLEMS)), default="quadratic", show_default=True)
@click.option("--solver", "solvers", multiple=True, type=click.Choice(sorted(SOLVERS)),
              help="solvers to run (repeat the option); default: all five")
@click.option("--batch-size", default="64", show_default=True, help="samples per mini-batch, or 'full'")
@click.option("--step-size", type=float, default=None, help="override every solver's step_size")
@click.option("--outer-ratio", type=float, default=None, help="override every solver's outer_ratio")
@click.option("--max-time", type=float, default=10.0, show_default=True, help="seconds of solver time per solver")
@click.option("--target", type=float, default=None, help="stop a solver once the metric is at or below this value")
@click.option("--seed", type=int, default=0, show_default=True, help="batch-order seed")
@click.option("--problem-seed", type=int, default=None, help="seed of the problem's data (default: the benchmark's)")
@click.option("--data-root", type=click.Path(exists=True, file_okay=True), default=None,
              help="folder holding mnist10k.npz (data_cleaning; l2_logistic then uses MNIST instead of digits)")
@click.option("--dtype", type=click.Choice(sorted(_DTYPES)), default="float64", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--threads", type=int, default=1, show_default=True, help="torch intra-op threads")
@click.option("--out", type=click.Path(file_okay=False), default="runs/bench", show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
def bench(problem: str, solvers: tuple[str, ...], batch_size: str, step_size: float | None, outer_ratio: float | None,
          max_time: float, target: float | None, seed: int, problem_seed: int | None, data_root: str | None, dtype: str,
          device: str, threads: int, out: str, progress: bool) -> None:
    """Run stochastic bilevel solvers on a benchmark_bilevel problem; print the metric against time.

    The metric is ‖∇h(x)‖² of the value function (exact: closed form for the quadratic, Newton +
    direct implicit solve for l2_logistic) or the test error for data_cleaning. Writes
    OUT/trace.csv, OUT/summary.json and OUT/bench.png.
    """
    from tqdm.auto import tqdm

    if batch_size != "full":
        try:
            bs: int | str = int(batch_size)
        except ValueError:
            raise click.BadParameter(f"{batch_size!r} is neither an integer nor 'full'", param_hint="--batch-size") from None
        if bs < 1:
            raise click.BadParameter(f"must be >= 1, got {bs}", param_hint="--batch-size")
    else:
        bs = "full"
    if max_time <= 0:
        raise click.BadParameter(f"must be > 0, got {max_time}", param_hint="--max-time")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine", param_hint="--device")
    torch.set_num_threads(threads)
    try:
        b = make_problem(problem, data_root=data_root, dtype=_DTYPES[dtype], device=device, seed=problem_seed)
    except ValueError as e:
        option = getattr(e, "option", None)
        raise click.BadParameter(str(e), param_hint=f"--{option.replace('_', '-')}" if option else None) from e
    overrides = {k: v for k, v in (("step_size", step_size), ("outer_ratio", outer_ratio)) if v is not None}
    try:
        chosen = [SOLVERS[name](**overrides) for name in (solvers or ("saba", "soba", "amigo", "stocbio", "f2sa"))]
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--step-size/--outer-ratio") from e
    traces = []
    for solver in chosen:
        name = type(solver).__name__
        bar = tqdm(total=max_time, desc=name, unit="s", disable=not progress, leave=False,
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.0f}s {postfix}")

        def on_eval(row: dict[str, float], _bar: Any = bar) -> None:
            _bar.n = min(row["time"], max_time)
            _bar.set_postfix_str(f"{b.value_name}={row['value']:.3e}")

        tr = run(solver, b, batch_size=bs, max_time=max_time, target=target, seed=seed, on_eval=on_eval)
        bar.close()
        traces.append(tr)
        click.echo(f"\n{tr.solver}  [{tr.stopped}]")
        click.echo(f"{'time (s)':>10} {'step':>8} {b.value_name:>14}")
        rows = list(tr.rows)
        stride = max(1, len(rows) // 12)
        for r in rows[::stride] + ([rows[-1]] if (len(rows) - 1) % stride else []):
            click.echo(f"{r['time']:10.3f} {int(r['step']):8d} {r['value']:14.4e}")
    targets = (1e-4, 1e-6) if b.value_name.startswith("|grad") else ()
    summary = write_results(Path(out), b, traces, targets)
    for s, v in summary["solvers"].items():
        extra = "  ".join(f"{k}={v[k]:.3f}s" if v[k] is not None else f"{k}=never" for k in v if k.startswith("time_to"))
        click.echo(f"{s.split('(')[0]:8s} final {b.value_name}={v['final']:.3e}  {extra}")
    click.echo(f"wrote {Path(out) / 'trace.csv'}, {Path(out) / 'summary.json'}, {Path(out) / 'bench.png'}")


__all__ = ["bench", "make_problem", "write_results"]
