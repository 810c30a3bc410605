"""Gradient-based hyperparameter optimization: data, the hyper-loop, plots and three tasks.

Hyperparameters λ are the outer variables of the bilevel problem min_λ E(w_T(λ), λ) with w_T the
end of the inner training dynamics (Franceschi et al. 2018, §2). This package holds what the
``bilevel hpo`` command and the ``examples/hpo_*.py`` scripts share:

* data: :func:`load_dataset` (scikit-learn digits offline, MNIST from a data root),
  :func:`split_dataset`, :func:`corrupt_labels`, :func:`minibatches`;
* options: each task's config is a frozen dataclass of declared options (:mod:`bilevel.options`)
  holding its hypergradient as a :class:`bilevel.Strategy`; :func:`make_config` builds one by name;
* the loop, in explicit state: :func:`hyper_loop` (``row, state = step(it, state)``; progress
  bar + CSV), :class:`HyperStep` (one hyper-iteration on a fixed data set) and its
  :class:`HyperState` (λ, its optimizer, where the next inner run starts), :func:`residual_summary`
  (max/last of Implicit's certificate over the hyper-steps), :func:`apply_hypergradient`,
  :func:`refit_and_evaluate`, :func:`write_json`;
* models and metrics: :func:`logistic_regression`, :func:`mlp`, :func:`init_params`,
  :func:`evaluate`, :func:`f1_score`; plots in :mod:`bilevel.hpo.plots`;
* tasks: ``lr`` (learning rate and momentum, :func:`run_lr`), ``l2`` (per-feature L2,
  :func:`run_l2`), ``clean`` (data hyper-cleaning, :func:`run_clean`), dispatched by :func:`run`;
* the command line ``bilevel hpo lr|l2|clean`` (:mod:`bilevel.hpo.cli`), generated from the configs.

Modules here import from the core's modules (``bilevel.solve``, ``bilevel.hypergrad``, …), never
from the package root ``bilevel``, which does not import ``bilevel.hpo``.
"""
from __future__ import annotations

from typing import Any

from bilevel.hpo.clean import CleanConfig, run_clean
from bilevel.hpo.config import ConvexConfig, HPOConfig, strategy_text
from bilevel.hpo.data import (
    DATASETS,
    OptionError,
    Split,
    TaskData,
    corrupt_labels,
    find_mnist,
    load_dataset,
    minibatches,
    split_dataset,
)
from bilevel.hpo.l2 import L2Config, run_l2
from bilevel.hpo.loop import (
    HyperState,
    HyperStep,
    apply_hypergradient,
    hyper_loop,
    refit_and_evaluate,
    residual_summary,
    write_json,
)
from bilevel.hpo.lr import LRConfig, run_lr
from bilevel.hpo.models import cross_entropy_loss, evaluate, f1_score, init_params, logistic_regression, mlp

TASKS: dict[str, tuple[type[HPOConfig], Any]] = {
    "clean": (CleanConfig, run_clean),
    "l2": (L2Config, run_l2),
    "lr": (LRConfig, run_lr),
}


def make_config(task: str, **options: Any) -> HPOConfig:
    """The validated config of ``task`` from keyword options (Python values); ``None`` keeps a default.

    ``hypergrad`` is a :class:`bilevel.Strategy` object (e.g. ``bilevel.Truncated(4)``); text such
    as ``"truncated:4"`` is parsed at the command line and in files (:func:`bilevel.options.from_text`).

    Raises:
        OptionError: unknown task, unknown option, or a bad value (``.option`` names the field).
    """
    if task not in TASKS:
        raise OptionError("task", f"unknown HPO task {task!r}; expected one of {list(TASKS)}")
    cls = TASKS[task][0]
    known = set(cls.__dataclass_fields__)
    unknown = [k for k in options if k not in known]
    if unknown:
        raise OptionError(unknown[0], f"task {task!r} has no option(s) {unknown}")
    return cls(**{k: v for k, v in options.items() if v is not None})


def run(config: HPOConfig) -> dict[str, Any]:
    """Run the task that ``config`` configures; returns its metrics (also in ``out/metrics.json``).

    ``metrics["hypergrad"]`` is the strategy as text (:func:`bilevel.hypergrad.to_string`).
    """
    for cls, runner in TASKS.values():
        if type(config) is cls:
            return runner(config)
    raise TypeError(f"run() needs one of {[c.__name__ for c, _ in TASKS.values()]}, got {type(config).__name__}")


__all__ = [
    "DATASETS",
    "TASKS",
    "CleanConfig",
    "ConvexConfig",
    "HPOConfig",
    "HyperState",
    "HyperStep",
    "L2Config",
    "LRConfig",
    "OptionError",
    "Split",
    "TaskData",
    "apply_hypergradient",
    "corrupt_labels",
    "cross_entropy_loss",
    "evaluate",
    "f1_score",
    "find_mnist",
    "hyper_loop",
    "init_params",
    "load_dataset",
    "logistic_regression",
    "make_config",
    "minibatches",
    "mlp",
    "refit_and_evaluate",
    "residual_summary",
    "run",
    "run_clean",
    "run_l2",
    "run_lr",
    "split_dataset",
    "strategy_text",
    "write_json",
]
