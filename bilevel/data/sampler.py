"""Pure, indexable episodic samplers (MetaOptNet section 3.2; Vinyals et al. 2016).

Reproducibility contract: episode ``j`` of meta-batch ``iteration`` is a function of
(``seed``, dataset name/split, ``iteration``, ``j``) only. Each episode draws from its own
``torch.Generator`` seeded with ``seed_from("episode", seed, stream, iteration, j)``. Hence
``sample(it, indices=[2, 3])`` equals rows 2:4 of ``sample(it)`` (data-parallel ranks each draw
their own episodes of the same meta-batch), and a resumed run continues exactly
(``state_dict()`` holds the next iteration number).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from bilevel.data.augment import Augmentation, concat_params
from bilevel.data.base import FewShotDataset
from bilevel.data.synthetic import SinusoidTasks, seed_from
from bilevel.data.transforms import standardize, to_unit

__all__ = ["EpisodePlan", "EpisodeSampler", "Episodes", "SinusoidSampler", "make_sampler"]


class Episodes(NamedTuple):
    """A meta-batch of B episodes (N ways, K shots, Q queries).

    Classification: ``support_x`` [B, N*K, C, H, W] float32, ``support_y`` [B, N*K] int64 in
    0..N-1, ``query_x`` [B, N*Q, C, H, W], ``query_y`` [B, N*Q]; examples are ordered
    class-major (labels ``0,..,0,1,..,1,...``). Regression (sinusoid): x and y are float
    [B, K, 1] and [B, Q, 1].
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Episodes:
        """The same episodes on ``device``."""
        return Episodes(*(t.to(device, non_blocking=non_blocking) for t in self))

    def pin_memory(self) -> Episodes:
        """The same episodes in pinned host memory (for asynchronous ``.to("cuda", True)``)."""
        return Episodes(*(t.pin_memory() for t in self))

    def episode(self, j: int) -> Episodes:
        """Episode ``j`` alone, without the batch dimension: ([N*K, ...], [N*K], ...)."""
        return Episodes(*(t[j] for t in self))

    @property
    def batch_size(self) -> int:
        return int(self.support_x.shape[0])


class EpisodePlan(NamedTuple):
    """Which examples an episode uses: ``classes`` [B, N] split class ids (label i <-> column
    i), ``support`` [B, N*K] and ``query`` [B, N*Q] indices into the dataset."""

    classes: Tensor
    support: Tensor
    query: Tensor


def _check_int(name: str, v: Any, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return v


class _PureSampler:
    """Shared position/state handling of the samplers (explicit, no hidden randomness)."""

    task = "classification"

    def __init__(self, stream: str, meta_batch: int, seed: int) -> None:
        self.meta_batch = _check_int("meta_batch", meta_batch)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self.stream = stream
        self.iteration = 0

    def _config(self) -> dict[str, Any]:
        return {"seed": self.seed, "stream": self.stream, "meta_batch": self.meta_batch}

    def _indices(self, indices: Sequence[int] | None) -> list[int]:
        if indices is None:
            return list(range(self.meta_batch))
        out = [int(i) for i in indices]
        if not out:
            raise ValueError("indices is empty: a sample needs at least one episode index")
        bad = [i for i in out if not 0 <= i < self.meta_batch]
        if bad:
            raise ValueError(f"episode indices {bad} outside 0..{self.meta_batch - 1} (meta_batch)")
        return out

    def generator(self, iteration: int, index: int) -> torch.Generator:
        """The generator of episode ``index`` of meta-batch ``iteration``."""
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        return torch.Generator().manual_seed(
            seed_from("episode", self.seed, self.stream, int(iteration), int(index))
        )

    def sample(self, iteration: int, indices: Sequence[int] | None = None) -> Episodes:
        raise NotImplementedError

    def next(self, indices: Sequence[int] | None = None) -> Episodes:
        """``sample(self.iteration, indices)``, then advance the position by one."""
        out = self.sample(self.iteration, indices)
        self.iteration += 1
        return out

    def __iter__(self) -> Iterator[Episodes]:
        while True:
            yield self.next()

    def state_dict(self) -> dict[str, Any]:
        """The position (next iteration) and the configuration it is valid for."""
        return {"iteration": self.iteration, **self._config()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position; ``ValueError`` if the state belongs to another configuration."""
        if "iteration" not in state:
            raise ValueError("sampler state lacks 'iteration'")
        mine = self._config()
        for k, v in mine.items():
            if k in state and state[k] != v:
                raise ValueError(
                    f"sampler state has {k}={state[k]!r} but this sampler has {k}={v!r}; "
                    "resuming would change the episodes"
                )
        it = state["iteration"]
        if isinstance(it, bool) or not isinstance(it, int) or it < 0:
            raise ValueError(f"sampler state 'iteration' must be an int >= 0, got {it!r}")
        self.iteration = it


class EpisodeSampler(_PureSampler):
    """N-way K-shot Q-query episodes from an in-memory :class:`FewShotDataset`.

    Invariants: within an episode the N classes are distinct and drawn uniformly without
    replacement; the K + Q examples of a class are distinct, the first K go to the support set
    and the next Q to the query set, so support and query never share an example; the label of
    a class is its position in a random permutation (labels 0..N-1). With ``within_alphabet``
    the episode first draws one alphabet uniformly among the split's alphabets, then its N
    classes uniformly from that alphabet (the within-alphabet one-shot protocol of Lake et al.
    2015: all N characters of an episode share an alphabet).

    Args:
        dataset: one split, e.g. ``load_dataset("omniglot", root, "train")``.
        ways: N classes per episode.
        shots: K support examples per class (the training shot may differ from the test shot:
            use one sampler per split).
        queries: Q query examples per class.
        meta_batch: B episodes per :meth:`sample` call.
        seed: seed of the episode streams.
        augment: optional :class:`~bilevel.data.augment.Augmentation` applied to support and
            query images (on [0, 1] floats, before mean/std); use it on training splits.
        within_alphabet: draw the N classes of every episode from one alphabet; needs the
            dataset's per-class alphabets (``metadata["class_alphabets"]``, set by the Omniglot
            loader) and at least N classes in every alphabet of the split.

    Example:
        >>> sampler = EpisodeSampler(train, ways=5, shots=1, queries=15, meta_batch=4)
        >>> ep = sampler.sample(0)            # or sampler.next() / iterate
        >>> ep.support_x.shape                # [4, 5, 1, 28, 28]
    """

    def __init__(
        self,
        dataset: FewShotDataset,
        ways: int,
        shots: int,
        queries: int,
        meta_batch: int = 1,
        seed: int = 0,
        augment: Augmentation | None = None,
        within_alphabet: bool = False,
    ) -> None:
        if not isinstance(dataset, FewShotDataset):
            raise TypeError(
                f"dataset must be a FewShotDataset, got {type(dataset).__name__}"
                + (" (use SinusoidSampler or make_sampler)" if isinstance(dataset, SinusoidTasks) else "")
            )
        super().__init__(f"{dataset.name}/{dataset.split}", meta_batch, seed)
        self.dataset = dataset
        self.ways = _check_int("ways", ways)
        self.shots = _check_int("shots", shots)
        self.queries = _check_int("queries", queries, lo=0)
        if augment is not None and not isinstance(augment, Augmentation):
            raise TypeError("augment must provide sample_params(n, generator) and apply(x, params)")
        self.augment = augment
        where = f"split {dataset.split!r} of {dataset.name!r}"
        if ways > dataset.n_classes:
            raise ValueError(
                f"ways={ways} but {where} has only {dataset.n_classes} classes"
            )
        counts = dataset.class_counts()
        need = shots + queries
        smallest = int(counts.min())
        if need > smallest:
            c = int(torch.argmin(counts))
            raise ValueError(
                f"shots + queries = {shots} + {queries} = {need} but class "
                f"{dataset.class_names[c]!r} of {where} has only {smallest} examples "
                f"(every class needs at least {need})"
            )
        self.within_alphabet = bool(within_alphabet)
        self._alphabets = _alphabet_classes(dataset, ways, where) if self.within_alphabet else None
        self._counts = counts
        self._order = torch.argsort(dataset.labels.cpu(), stable=True)
        self._offsets = torch.cumsum(counts, 0) - counts
        self._max = int(counts.max())
        self._uniform = smallest == self._max

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "ways": self.ways, "shots": self.shots, "queries": self.queries,
                "within_alphabet": self.within_alphabet}

    def _plan_one(self, g: torch.Generator) -> tuple[Tensor, Tensor]:
        n, k = self.ways, self.shots + self.queries
        if self._alphabets is None:
            classes = torch.randperm(self.dataset.n_classes, generator=g)[:n]
        else:
            members = self._alphabets[int(torch.randint(len(self._alphabets), (1,), generator=g))]
            classes = members[torch.randperm(members.numel(), generator=g)[:n]]
        keys = torch.rand(n, self._max, generator=g)
        if not self._uniform:
            keys.masked_fill_(torch.arange(self._max) >= self._counts[classes, None], 2.0)
        pos = keys.argsort(dim=1)[:, :k]
        return classes, self._order[self._offsets[classes, None] + pos]

    def plan(self, iteration: int, indices: Sequence[int] | None = None) -> EpisodePlan:
        """The dataset indices of the episodes :meth:`sample` returns (no images touched)."""
        return self._plan(iteration, self._indices(indices))[0]

    def _plan(self, iteration: int, idx: list[int]) -> tuple[EpisodePlan, list[torch.Generator]]:
        gens, classes, picks = [], [], []
        for j in idx:
            g = self.generator(iteration, j)
            c, p = self._plan_one(g)
            gens.append(g)
            classes.append(c)
            picks.append(p)
        cls = torch.stack(classes)
        pick = torch.stack(picks)  # [B, N, K+Q]
        b = len(idx)
        support = pick[:, :, : self.shots].reshape(b, -1)
        query = pick[:, :, self.shots:].reshape(b, -1)
        return EpisodePlan(cls, support, query), gens

    def sample(self, iteration: int, indices: Sequence[int] | None = None) -> Episodes:
        """Episodes of meta-batch ``iteration`` (all B, or only ``indices`` of them).

        Args:
            iteration: meta-batch number (>= 0).
            indices: subset of 0..B-1 (e.g. this rank's share); default all.

        Returns:
            :class:`Episodes` with leading dimension ``len(indices)``.
        """
        idx = self._indices(indices)
        plan, gens = self._plan(iteration, idx)
        b, n, k, q = len(idx), self.ways, self.shots, self.queries
        params = None
        if self.augment is not None:
            parts = [self.augment.sample_params(n * (k + q), g) for g in gens]
            params = [concat_params([{key: v[: n * k] for key, v in p.items()} for p in parts]),
                      concat_params([{key: v[n * k:] for key, v in p.items()} for p in parts])]
        xs = []
        # Support and query are gathered separately: two smaller allocations are much cheaper
        # than one large one (the allocator reuses them instead of mapping fresh pages).
        images = self.dataset.images
        for part, pidx in enumerate((plan.support, plan.query)):
            x = to_unit(images.index_select(0, pidx.reshape(-1).to(images.device)))
            if params is not None:
                x = self.augment.apply(x, params[part])
            if images.dtype == torch.uint8:
                x = standardize(x, self.dataset.transform)
            xs.append(x.reshape(b, pidx.shape[1], *x.shape[1:]))
        labels = torch.arange(n, device=images.device)
        sy = labels.repeat_interleave(k).expand(b, n * k).contiguous()
        qy = labels.repeat_interleave(q).expand(b, n * q).contiguous()
        return Episodes(xs[0], sy, xs[1], qy)


def _alphabet_classes(dataset: FewShotDataset, ways: int, where: str) -> list[Tensor]:
    """The class ids of every alphabet of ``dataset`` (sorted by alphabet name), each with >= ``ways`` classes."""
    alphabets = dataset.metadata.get("class_alphabets")
    if alphabets is None:
        raise ValueError(f"within_alphabet=True (--within-alphabet) draws the classes of an episode from one alphabet, "
                         f"but the classes of {where} carry no alphabet (metadata 'class_alphabets'; the Omniglot "
                         "loader provides it)")
    if len(alphabets) != dataset.n_classes:
        raise ValueError(f"{where}: metadata 'class_alphabets' has {len(alphabets)} entries for {dataset.n_classes} classes")
    groups: dict[str, list[int]] = {}
    for c, a in enumerate(alphabets):
        groups.setdefault(str(a), []).append(c)
    small = {a: len(cs) for a, cs in sorted(groups.items()) if len(cs) < ways}
    if small:
        listing = ", ".join(f"{a!r} ({m})" for a, m in small.items())
        raise ValueError(f"within_alphabet=True with ways={ways}: {where} has alphabets with fewer than {ways} classes: "
                         f"{listing} (classes are characters, 4 per character with rotations). Every alphabet of the "
                         "split must have at least N classes: lower --ways, or use --rotations")
    return [torch.tensor(cs) for _, cs in sorted(groups.items())]


class SinusoidSampler(_PureSampler):
    """K-shot sinusoid regression episodes (MAML section 5.1).

    Each episode draws amplitude A, phase phi, then K support and Q query inputs x ~ U[x_range]
    and y = A sin(x - phi). Same purity contract as :class:`EpisodeSampler`.

    Args:
        tasks: ``load_dataset("sinusoid", split=...)``.
        shots: K support points; queries: Q query points; meta_batch: B; seed: stream seed.
    """

    task = "regression"

    def __init__(self, tasks: SinusoidTasks, shots: int, queries: int, meta_batch: int = 1,
                 seed: int = 0) -> None:
        if not isinstance(tasks, SinusoidTasks):
            raise TypeError(f"tasks must be SinusoidTasks, got {type(tasks).__name__}")
        super().__init__(f"{tasks.name}/{tasks.split}", meta_batch, seed)
        self.tasks = tasks
        self.ways = 1
        self.shots = _check_int("shots", shots)
        self.queries = _check_int("queries", queries, lo=0)

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "shots": self.shots, "queries": self.queries}

    def task_params(self, iteration: int, indices: Sequence[int] | None = None
                    ) -> tuple[Tensor, Tensor]:
        """(amplitude [B], phase [B]) of the episodes :meth:`sample` returns."""
        amp, ph = [], []
        for j in self._indices(indices):
            a, p, _ = self._draw(self.generator(iteration, j))
            amp.append(a)
            ph.append(p)
        return torch.stack(amp), torch.stack(ph)

    def _draw(self, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        t = self.tasks
        u = torch.rand(2, generator=g, dtype=torch.float64)
        amp = t.amplitude[0] + (t.amplitude[1] - t.amplitude[0]) * u[0]
        ph = t.phase[0] + (t.phase[1] - t.phase[0]) * u[1]
        lo, hi = t.x_range
        x = lo + (hi - lo) * torch.rand(self.shots + self.queries, 1, generator=g, dtype=torch.float64)
        return amp.float(), ph.float(), x.float()

    def sample(self, iteration: int, indices: Sequence[int] | None = None) -> Episodes:
        """Episodes: support x, y [B, K, 1], query x, y [B, Q, 1] float32."""
        amps, phs, xs = [], [], []
        for j in self._indices(indices):
            a, p, x = self._draw(self.generator(iteration, j))
            amps.append(a)
            phs.append(p)
            xs.append(x)
        x = torch.stack(xs)
        y = SinusoidTasks.function(x, torch.stack(amps), torch.stack(phs))
        k = self.shots
        return Episodes(x[:, :k], y[:, :k], x[:, k:], y[:, k:])


def make_sampler(
    dataset: FewShotDataset | SinusoidTasks,
    *,
    ways: int | None,
    shots: int,
    queries: int,
    meta_batch: int = 1,
    seed: int = 0,
    augment: Augmentation | None = None,
    within_alphabet: bool = False,
) -> EpisodeSampler | SinusoidSampler:
    """The right sampler for ``dataset``: :class:`EpisodeSampler` or :class:`SinusoidSampler`
    (``ways`` must then be None or 1, ``augment`` None, ``within_alphabet`` False)."""
    if isinstance(dataset, SinusoidTasks):
        if ways not in (None, 1) or augment is not None:
            raise ValueError("sinusoid regression episodes take no ways (or ways=1) and no augment")
        if within_alphabet:
            raise ValueError("within_alphabet=True (--within-alphabet) needs classes with alphabets; sinusoid tasks have none")
        return SinusoidSampler(dataset, shots, queries, meta_batch, seed)
    if ways is None:
        raise ValueError("ways is required for classification datasets")
    return EpisodeSampler(dataset, ways, shots, queries, meta_batch, seed, augment, within_alphabet)

