"""Options shared by every HPO task, validated on construction (:class:`HPOConfig`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch

from bilevel.hpo.data import DATASETS, OptionError, TaskData, load_dataset, split_dataset, to_device
from bilevel.hpo.loop import STRATEGIES


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_int(name: str, value: Any, low: int, *, optional: bool = False) -> None:
    """Raise :class:`OptionError` unless ``value`` is an int ≥ ``low`` (or None when ``optional``)."""
    if value is None and optional:
        return
    if not _is_int(value) or value < low:
        raise OptionError(name, f"{name} must be an integer >= {low}, got {value!r}")


def check_float(name: str, value: Any, low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False) -> None:
    """Raise :class:`OptionError` unless ``value`` is a finite number in the given interval."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise OptionError(name, f"{name} must be a number in {lo}{low:g}, {high:g}{hi}, got {value!r}")


@dataclass
class HPOConfig:
    """Options shared by the ``lr``, ``l2`` and ``clean`` tasks (each subclass sets its defaults).

    Attributes:
        dataset: ``"digits"`` (offline) or ``"mnist"``; ``None`` picks mnist when ``data_root``
            is given, digits otherwise.
        data_root: folder with ``mnist10k.npz`` or torchvision's ``MNIST/raw``.
        download: allow torchvision to download MNIST (never done implicitly).
        out: output folder (log.csv, metrics.json, PNGs); ``None`` writes nothing.
        seed: seed of the split, the label noise, initialisations and mini-batches.
        device: torch device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        hyper_steps: number of hyper-iterations (updates of λ).
        inner_steps: T, inner steps per hypergradient; ``None`` = the task's default for the strategy.
        hypergrad: strategy name, one of the task's ``ALLOWED`` (see :func:`make_strategy`).
        hyper_lr: Adam step size on λ; ``None`` = the task's default.
        n_train, n_val, n_test: split sizes; ``None`` = the task's default for the dataset.
        truncate: k of ``Truncated(k)`` when ``hypergrad="truncated"``.
        cg_iters: CG iterations of ``Implicit(CG)`` when ``hypergrad="implicit"``.
        progress: show a progress bar.
    """

    TASK: ClassVar[str] = ""
    ALLOWED: ClassVar[tuple[str, ...]] = STRATEGIES
    SPLITS: ClassVar[dict[str, tuple[int, int, int]]] = {"digits": (800, 400, 597), "mnist": (4000, 2000, 4000)}
    DEFAULT_HYPER_LR: ClassVar[float] = 0.1

    dataset: str | None = None
    data_root: str | Path | None = None
    download: bool = False
    out: str | Path | None = None
    seed: int = 0
    device: str = "cpu"
    hyper_steps: int = 50
    inner_steps: int | None = None
    hypergrad: str = "reverse"
    hyper_lr: float | None = None
    n_train: int | None = None
    n_val: int | None = None
    n_test: int | None = None
    truncate: int | None = None
    cg_iters: int = 20
    progress: bool = True

    def __post_init__(self) -> None:
        if self.dataset is None:
            self.dataset = "mnist" if self.data_root is not None else "digits"
        if self.dataset not in DATASETS:
            raise OptionError("dataset", f"unknown dataset {self.dataset!r}; expected one of {list(DATASETS)}")
        check_int("seed", self.seed, 0)
        check_int("hyper_steps", self.hyper_steps, 1)
        check_int("inner_steps", self.inner_steps, 1, optional=True)
        for name in ("n_train", "n_val", "n_test"):
            check_int(name, getattr(self, name), 0, optional=True)
        check_int("truncate", self.truncate, 1, optional=True)
        check_int("cg_iters", self.cg_iters, 1)
        if self.hyper_lr is not None:
            check_float("hyper_lr", self.hyper_lr, 0.0, low_open=True)
        if self.hypergrad not in self.ALLOWED:
            raise OptionError(
                "hypergrad", f"task {self.TASK!r} supports hypergrad in {list(self.ALLOWED)}, got {self.hypergrad!r}"
            )
        if self.truncate is not None and self.hypergrad != "truncated":
            raise OptionError("truncate", f"truncate applies to hypergrad='truncated' only, got hypergrad={self.hypergrad!r}")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise OptionError("device", f"invalid device {self.device!r}: {e}") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise OptionError("device", f"device {self.device!r} requested but CUDA is not available")
        if self.truncate is not None and self.inner_steps is not None and self.truncate > self.inner_steps:
            raise OptionError("truncate", f"truncate={self.truncate} exceeds inner_steps={self.inner_steps}")

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

    def summary(self) -> dict[str, Any]:
        """The options as a JSON-friendly dict (recorded in metrics.json)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(zip(("n_train", "n_val", "n_test"), self.split_sizes()))
        out["hyper_lr"] = self.lr_hyper
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in out.items()}





@dataclass
class ConvexConfig(HPOConfig):
    """Options of the tasks whose inner problem is a strongly convex (linear-model) fit.

    The inner dynamics is heavy-ball gradient descent on the full training set. With
    ``hypergrad="implicit"`` each hyper-step warm-starts from the previous w_T and runs
    ``inner_steps`` more steps (the implicit hypergradient depends on w_T ≈ argmin only); the
    unrolled strategies start from w_0 = 0 every time. Reported losses refit from w_0 = 0 for
    ``eval_steps`` steps, the same procedure for every λ compared.

    Attributes:
        inner_lr, inner_momentum: η and μ of the heavy-ball inner dynamics.
        eval_steps: inner steps of the refits that the reported numbers come from.
    """

    hypergrad: str = "implicit"
    inner_lr: float = 0.5
    inner_momentum: float = 0.9
    eval_steps: int = 300

    WARM_INNER_STEPS: ClassVar[int] = 30

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("inner_lr", self.inner_lr, 0.0, low_open=True)
        check_float("inner_momentum", self.inner_momentum, 0.0, 1.0, high_open=True)
        check_int("eval_steps", self.eval_steps, 1)

    @property
    def steps(self) -> int:
        """T per hypergradient: ``inner_steps``, else a warm-started 30 (implicit) or ``eval_steps``."""
        if self.inner_steps is not None:
            return self.inner_steps
        return self.WARM_INNER_STEPS if self.hypergrad == "implicit" else self.eval_steps

    @property
    def warm_start(self) -> bool:
        """Whether each hyper-step starts the inner run from the previous w_T (implicit only)."""
        return self.hypergrad == "implicit"


__all__ = ["ConvexConfig", "HPOConfig", "check_float", "check_int"]
