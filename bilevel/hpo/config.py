"""Options shared by every HPO task, declared once (:mod:`bilevel.options`) and validated on construction.

Each task's configuration is a frozen dataclass whose fields are declared with
:func:`bilevel.options.option`; the same declaration validates Python construction
(``LRConfig(momentum=1.0)`` raises :class:`bilevel.options.OptionError`), ``--config`` files and the
flags of ``bilevel hpo TASK``, which are generated from it (:mod:`bilevel.hpo.cli`).

The hypergradient is a :class:`bilevel.Strategy` object (text such as ``truncated:4`` is parsed
at the command line and in files by the one parser, :func:`bilevel.hypergrad.from_string`). Every task
accepts each strategy whose hypergradient is meaningful for its λ and refuses the others with the
reason (:meth:`HPOConfig.refusal`): e.g. an implicit hypergradient of a learning rate is zero.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from bilevel.hpo.data import DATASETS, TaskData, load_dataset, split_dataset, to_device
from bilevel.hypergrad import FirstOrder, Implicit, NoInner, Strategy, to_string
from bilevel.linsolve import CG
from bilevel.options import OptionError, declared, option, validate

HYPERGRAD_HELP = ("Hypergradient strategy (bilevel.hypergrad.from_string): forward, reverse, checkpointed:K, "
                  "truncated:K, implicit-cg:K, implicit-neumann:K[:ALPHA], implicit-fixed-point:K, implicit-exact, "
                  "first-order, no-inner; each task refuses those whose hypergradient is meaningless for it, saying why.")
#: the default hypergradient of the convex tasks (``l2``, ``clean``): see :class:`ConvexConfig`.
CERTIFIED_IMPLICIT = Implicit(CG(maxiter=300, tol=1e-3), tol=1e-2, warm_start=True)
CONVEX_HYPERGRAD_HELP = ("Hypergradient strategy. The default is HOAG's rule: each inner run continues from the previous "
                         "one until its optimality residual is within tol (at most --eval-steps steps), then warm-started "
                         "CG solves to 1e-3; a hyper-step that misses tol warns. Also implicit-cg:K[:STOP], "
                         "implicit-neumann:K[:ALPHA], implicit-fixed-point:K, implicit-exact (options :tol=X, "
                         ":warm-start), reverse, checkpointed:K, truncated:K or forward; first-order and no-inner are "
                         "refused (zero hypergradient).")


def split_help(what: str, splits: dict[str, tuple[int, int, int]], i: int) -> str:
    """The help text of a split-size option, naming its default on each dataset."""
    return f"{what}-set size [default: " + ", ".join(f"{v[i]} on {k}" for k, v in splits.items()) + "]."


def strategy_text(strategy: Strategy) -> str:
    """``to_string(strategy)``, or its ``repr`` when it has no text form (e.g. a custom condition)."""
    try:
        return to_string(strategy)
    except ValueError:
        return repr(strategy)


@dataclass(frozen=True)
class HPOConfig:
    """Options shared by the ``lr``, ``l2`` and ``clean`` tasks (each subclass sets its defaults).

    Invariant: a constructed config is valid — every declared field is in its declared range,
    ``dataset`` and ``hypergrad`` are resolved (never ``None``), and ``hypergrad`` gives this task
    a meaningful hypergradient for ``steps`` inner steps.

    Attributes (declared options; ``None`` = the task's default):
        dataset: ``"digits"`` (offline) or ``"mnist"``; ``None`` picks mnist when ``data_root``
            is given, digits otherwise.
        data_root: folder with ``mnist10k.npz`` or torchvision's ``MNIST/raw`` (or the ``.npz``).
        download: allow torchvision to download MNIST (never done implicitly).
        out: output folder (log.csv, metrics.json, PNGs); ``None`` writes nothing.
        seed: seed of the split, the label noise, initialisations and mini-batches.
        device: torch device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        threads: ``torch.set_num_threads`` for the duration of the run.
        hyper_steps: number of hyper-iterations (updates of λ).
        inner_steps: T, inner steps per hypergradient (see :attr:`steps`).
        hypergrad: the hypergradient strategy (see :meth:`refusal`).
        hyper_lr: Adam step size on λ (see :attr:`lr_hyper`).
        n_train, n_val, n_test: split sizes (see :meth:`split_sizes`).
        progress: show a progress bar.
    """

    TASK: ClassVar[str] = ""
    SPLITS: ClassVar[dict[str, tuple[int, int, int]]] = {"digits": (800, 400, 597), "mnist": (4000, 2000, 4000)}
    DEFAULT_HYPER_LR: ClassVar[float] = 0.1
    DEFAULT_INNER_STEPS: ClassVar[int] = 100

    dataset: str | None = option(None, help="digits (scikit-learn, offline) or mnist; default: mnist when --data-root "
                                 "is given, else digits.", choices=DATASETS)
    data_root: str | None = option(None, help="Folder with mnist10k.npz or torchvision's MNIST/raw (or the .npz file "
                                   "itself).")
    download: bool = option(False, help="Let torchvision download MNIST into --data-root.")
    out: str | None = option(None, help="Output folder for log.csv, metrics.json and PNGs [command's default: "
                             "runs/hpo-TASK; from Python, None writes nothing].")
    seed: int = option(0, help="Seed of the split, label noise, inits and mini-batches.", min=0)
    device: str = option("cpu", help="Torch device: cpu, cuda, cuda:1, …")
    threads: int | None = option(None, help="torch.set_num_threads for this run [default: torch's].", min=1)
    hyper_steps: int = option(50, help="Hyper-iterations (updates of the hyperparameters).", min=1)
    inner_steps: int | None = option(None, help="Inner steps T per hypergradient [default: the task's].", min=1)
    hypergrad: Strategy | None = option(None, help=HYPERGRAD_HELP)
    hyper_lr: float | None = option(None, help="Adam step size on the hyperparameters [default: 0.1].",
                                    min=0, min_open=True)
    n_train: int | None = option(None, help=split_help("Training", SPLITS, 0), min=1)
    n_val: int | None = option(None, help=split_help("Validation", SPLITS, 1), min=1)
    n_test: int | None = option(None, help=split_help("Test", SPLITS, 2), min=0)
    progress: bool = option(True, help="Show a progress bar.")

    def __post_init__(self) -> None:
        for name in ("data_root", "out"):  # paths are kept as text (declared type str)
            if isinstance(getattr(self, name), os.PathLike):
                object.__setattr__(self, name, os.fspath(getattr(self, name)))
        if self.dataset is None:
            object.__setattr__(self, "dataset", "mnist" if self.data_root is not None else "digits")
        if self.hypergrad is None:
            object.__setattr__(self, "hypergrad", self.default_hypergrad())
        validate(self)
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise OptionError("device", f"invalid device {self.device!r}: {e}; use cpu, cuda or cuda:N") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise OptionError("device", f"device {self.device!r} requested but CUDA is not available; use cpu")
        self.check()
        strategy = self.hypergrad
        assert strategy is not None  # resolved above
        reason = self.refusal(strategy)
        if reason is not None:
            raise OptionError("hypergrad", f"`bilevel hpo {self.TASK}` cannot use hypergrad={strategy_text(strategy)}: {reason}")
        try:
            strategy.validate(self.steps)
        except ValueError as e:
            raise OptionError("hypergrad", f"hypergrad={strategy_text(strategy)}: {e} (T = {self.steps} inner steps per "
                                           "hypergradient; change --inner-steps or the strategy)") from None

    # ------------------------------------------------------------------ what each task overrides
    def default_hypergrad(self) -> Strategy:
        """The strategy used when ``hypergrad`` is ``None``: the field's declared default.

        Tasks whose default depends on other options override it (``lr``: reverse for a schedule).
        """
        default = type(self).__dataclass_fields__["hypergrad"].default
        if not isinstance(default, Strategy):
            raise OptionError("hypergrad", f"{type(self).__name__} has no default hypergrad; pass a bilevel.Strategy")
        return default

    def refusal(self, strategy: Strategy) -> str | None:
        """Why ``strategy`` gives this task no meaningful hypergradient, or ``None`` if it does."""
        return None

    def check(self) -> None:
        """Task-specific checks across options (raise :class:`OptionError` naming the option)."""

    @property
    def steps(self) -> int:
        """T per hypergradient: ``inner_steps``, else the task's default."""
        return self.DEFAULT_INNER_STEPS if self.inner_steps is None else self.inner_steps

    # ------------------------------------------------------------------ derived values
    @property
    def lr_hyper(self) -> float:
        """The Adam step size on λ (``hyper_lr`` or the task's default)."""
        return self.DEFAULT_HYPER_LR if self.hyper_lr is None else float(self.hyper_lr)

    def split_sizes(self) -> tuple[int, int, int]:
        """(n_train, n_val, n_test), filling unset sizes with the task's default for the dataset."""
        default = self.SPLITS[str(self.dataset)]
        got = (self.n_train, self.n_val, self.n_test)
        return tuple(d if v is None else v for v, d in zip(got, default))  # type: ignore[return-value]

    def load_data(self) -> TaskData:
        """Load the dataset and split it with a generator seeded by ``seed`` (on ``device``)."""
        x, y, k = load_dataset(str(self.dataset), self.data_root, download=self.download)
        n_train, n_val, n_test = self.split_sizes()
        data = split_dataset(x, y, n_train, n_val, n_test, generator=self.generator(0), num_classes=k, name=str(self.dataset))
        return to_device(data, self.device)

    def generator(self, stream: int) -> torch.Generator:
        """A CPU generator for random stream ``stream`` of this run (derived from ``seed``)."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + stream)

    def out_path(self, name: str) -> Path | None:
        """``out/name``, or None when the run writes no files."""
        return None if self.out is None else Path(self.out) / name

    @contextmanager
    def threads_scope(self) -> Iterator[None]:
        """``torch.set_num_threads(threads)`` inside the block (restored after); nothing when unset."""
        if self.threads is None:
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def summary(self) -> dict[str, Any]:
        """The options as JSON (recorded in metrics.json): the strategy as text, defaults resolved."""
        out = {f.name: (strategy_text(v) if isinstance(v := getattr(self, f.name), Strategy) else v)
               for f, _, _ in declared(self)}
        out.update(zip(("n_train", "n_val", "n_test"), self.split_sizes()))
        out.update(hyper_lr=self.lr_hyper, inner_steps=self.steps)
        return out


C = TypeVar("C", bound=HPOConfig)


def task_runner(runner: Callable[[C], dict[str, Any]]) -> Callable[[C], dict[str, Any]]:
    """Decorate a task's ``run_*(config)``: it runs under ``config.threads_scope()``."""

    @functools.wraps(runner)
    def run(config: C) -> dict[str, Any]:
        with config.threads_scope():
            return runner(config)

    return run


#: why no-inner is refused by every task: E depends on λ only through w_T.
ZERO_NO_INNER = ("no-inner treats w_T as a constant, and the validation loss depends on λ only through w_T: "
                 "the hypergradient would be zero")


@dataclass(frozen=True)
class ConvexConfig(HPOConfig):
    """Options of the tasks whose inner problem is a strongly convex (linear-model) fit.

    The inner dynamics is heavy-ball gradient descent on the full training set. With an
    ``Implicit`` hypergradient (default) each hyper-step restarts the dynamics at the previous
    w_T and runs ``inner_steps`` (default 30) steps at a time until the optimality certificate
    holds — r_opt = ‖∇_w L(w_T, λ_k)‖ / ‖∇_w L(w_0, λ_0)‖ ≤ ``tol``, relative to the cold start —
    or ``eval_steps`` steps are spent (:class:`bilevel.hpo.HyperStep` with ``max_steps``); the
    unrolled strategies (reverse, checkpointed, truncated, forward) start from w_0 = 0 every time
    and run ``eval_steps`` steps unless ``inner_steps`` is set. Reported losses refit from
    w_0 = 0 for ``eval_steps`` steps, the same procedure for every λ compared.

    The default hypergradient, ``implicit-cg:300:0.001:tol=0.01:warm-start``, is HOAG's rule
    (Pedregosa 2016, Alg. 1): the inner problem and the linear system are each solved to a
    relative tolerance, both warm-started. Its tolerance, 1e-2 for both residuals, is HOAG's
    initial one (``epsilon_tol_init = 0.01``, relative to the same cold-start gradient norm),
    kept fixed over the 50–60 hyper-steps (HOAG lets it decrease, which its convergence proof
    needs; these tasks run a fixed budget of Adam steps). Measured with seed 0, the defaults
    stay within it at every hyper-step on digits and MNIST, so they run silent; the stricter 1e-3
    costs 2–6× the inner and CG work, still misses it at a few hyper-steps within ``eval_steps``,
    and changes no reported number beyond the third decimal. ``--hypergrad`` with another
    ``:tol=`` (or ``implicit-cg:K`` at the library's 1e-3) is certified at that tolerance: a
    hyper-step whose residuals exceed it warns (``InexactHypergradientWarning``) with both
    numbers. ``log.csv`` records each hyper-step's ``optimality``, ``linear_residual``,
    ``linear_iterations`` and ``inner_steps``; ``metrics.json`` their max and last values.

    What the certificate does not say: residuals bound the hypergradient's error only up to the
    condition number of the inner Hessian. Against an exact float64 hypergradient (Newton's
    method, dense solve) along the default path on digits, the relative error is 3–14% for
    ``clean`` (31% at the last hyper-step; 10–28% with the former one-run ``implicit-cg:20``) and
    29–117% for ``l2``, whose tuned per-feature weights make the inner problem ill-conditioned
    (12–90% even at tol = 1e-3). The reported numbers come from refits, so they are true
    whatever the hypergradient's error; it only decides how well the search goes.

    λ enters the inner objective only (a penalty, example weights), so ``first-order`` and
    ``no-inner`` give a zero hypergradient and are refused.

    Attributes:
        inner_lr, inner_momentum: η and μ of the heavy-ball inner dynamics.
        eval_steps: inner steps of the refits that the reported numbers come from (and the most
            inner steps an implicit hyper-step may run).
    """

    WARM_INNER_STEPS: ClassVar[int] = 30
    #: what λ is in the inner objective (for the refusal messages).
    LAMBDA_ROLE: ClassVar[str] = "a term of the inner objective"
    ALTERNATIVES: ClassVar[str] = "Use implicit-cg:K, implicit-neumann:K[:ALPHA], reverse, checkpointed:K, truncated:K or forward"

    inner_steps: int | None = option(None, help="Inner steps T per hypergradient [default: with implicit-*, 30 at a "
                                     "time from the previous w_T until the optimality residual is within the strategy's "
                                     "tol (at most --eval-steps); otherwise --eval-steps from w_0 = 0].", min=1)
    hypergrad: Strategy | None = option(CERTIFIED_IMPLICIT, help=CONVEX_HYPERGRAD_HELP)
    inner_lr: float = option(0.5, help="Inner step size η.", min=0, min_open=True)
    inner_momentum: float = option(0.9, help="Inner momentum μ.", min=0, max=1, max_open=True)
    eval_steps: int = option(300, help="Inner steps of the refits the reported numbers come from.", min=1)

    def refusal(self, strategy: Strategy) -> str | None:
        if isinstance(strategy, FirstOrder):
            return (f"first-order treats the inner gradients as constants, and λ ({self.LAMBDA_ROLE}) reaches w_T only "
                    f"through them: the hypergradient would be zero. {self.ALTERNATIVES}")
        if isinstance(strategy, NoInner):
            return f"{ZERO_NO_INNER}. {self.ALTERNATIVES}"
        return None

    @property
    def steps(self) -> int:
        """T per hypergradient (per chunk for implicit): ``inner_steps``, else 30 (implicit) or ``eval_steps``."""
        if self.inner_steps is not None:
            return self.inner_steps
        return self.WARM_INNER_STEPS if self.warm_start else self.eval_steps

    @property
    def max_inner_steps(self) -> int | None:
        """Implicit: the most inner steps one hyper-step runs to certify w_T (``eval_steps``, at least T); else None."""
        return max(self.eval_steps, self.steps) if self.warm_start else None

    @property
    def warm_start(self) -> bool:
        """Whether each hyper-step starts the inner run from the previous w_T (implicit only)."""
        return isinstance(self.hypergrad, Implicit)


__all__ = ["CERTIFIED_IMPLICIT", "CONVEX_HYPERGRAD_HELP", "HYPERGRAD_HELP", "ConvexConfig", "HPOConfig", "split_help", "strategy_text", "task_runner"]
