"""Gradient-based hyperparameter optimization: data, the hyper-loop, plots and three tasks.

Hyperparameters λ are the outer variables of the bilevel problem min_λ E(w_T(λ), λ) with w_T the
end of the inner training dynamics (Franceschi et al. 2018, §2). This package holds what the
``bilevel hpo`` command and the ``examples/hpo_*.py`` scripts share:

* data: :func:`load_dataset` (scikit-learn digits offline, MNIST from a data root),
  :func:`split_dataset`, :func:`corrupt_labels`, :func:`minibatches`;
* the loop: :func:`hyper_loop` (progress bar + CSV), :func:`hyper_step`,
  :func:`apply_hypergradient`, :func:`make_strategy`, :func:`write_json`;
* models and metrics: :func:`logistic_regression`, :func:`mlp`, :func:`init_params`,
  :func:`evaluate`, :func:`f1_score`; plots in :mod:`bilevel.hpo.plots`;
* tasks: ``lr`` (learning rate and momentum, :func:`run_lr`), ``l2`` (per-feature L2,
  :func:`run_l2`), ``clean`` (data hyper-cleaning, :func:`run_clean`), dispatched by :func:`run`.
"""
from __future__ import annotations

from typing import Any

from bilevel.hpo.clean import CleanConfig, run_clean
from bilevel.hpo.config import ConvexConfig, HPOConfig
from bilevel.hpo.l2 import L2Config, run_l2
from bilevel.hpo.lr import LRConfig, run_lr
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
from bilevel.hpo.loop import (
    STRATEGIES,
    apply_hypergradient,
    hyper_loop,
    hyper_step,
    make_strategy,
    refit_and_evaluate,
    write_json,
)
from bilevel.hpo.models import cross_entropy_loss, evaluate, f1_score, init_params, logistic_regression, mlp

TASKS: dict[str, tuple[type[HPOConfig], Any]] = {
    "clean": (CleanConfig, run_clean),
    "l2": (L2Config, run_l2),
    "lr": (LRConfig, run_lr),
}


def make_config(task: str, **options: Any) -> HPOConfig:
    """The validated config of ``task`` from keyword options; ``None`` values keep the defaults.

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
    """Run the task that ``config`` configures; returns its metrics (also in ``out/metrics.json``)."""
    for cls, runner in TASKS.values():
        if type(config) is cls:
            return runner(config)
    raise TypeError(f"run() needs one of {[c.__name__ for c, _ in TASKS.values()]}, got {type(config).__name__}")


__all__ = [
    "DATASETS",
    "STRATEGIES",
    "TASKS",
    "CleanConfig",
    "ConvexConfig",
    "HPOConfig",
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
    "hyper_step",
    "init_params",
    "load_dataset",
    "logistic_regression",
    "make_strategy",
    "make_config",
    "minibatches",
    "mlp",
    "refit_and_evaluate",
    "run",
    "run_clean",
    "run_l2",
    "run_lr",
    "split_dataset",
    "write_json",
]
