"""Hypergradient strategies: how d w_T / d λ is computed. Pass one to :func:`bilevel.solve`.

All strategies run the same inner dynamics and return the same w_T; they differ only in the
derivative that autograd sees when the outer loss is back-propagated:

==================  ==============================================================  ===============
strategy            d w_T / d(λ, w_0) seen by autograd                               memory in T
==================  ==============================================================  ===============
``Reverse()``       exact, by back-propagation through all T steps                   O(T)
``Checkpointed(k)`` exact, recomputing each segment of k steps during backward       O(T/k + k)
``Truncated(k)``    through the last k steps only; s_{T-k} is a constant             O(k)
``FirstOrder()``    inner gradients are constants (first-order MAML)                 O(T) small
``NoInner()``       zero (Franceschi et al. 2018, App. A "Approx")                   O(1)
``Forward()``       exact, forward mode (RTRL) with ``torch.func.jvp``; cost ∝ m     O(1)
``Implicit(s)``     implicit function theorem at w_T on F(w, λ) = 0, solved with s   O(1)
==================  ==============================================================  ===============

``Implicit`` certifies its result (optimality residual of w_T, residual of the linear solve; it
warns or raises above ``tol``) and ``Forward`` refuses, before its first step, a run whose
tangents (m × the dynamics state) would not fit in memory. Every strategy without Python
callables has a text form: ``str(strategy)`` (e.g. ``implicit-cg:30:tol=0.0001``) is read back by
:func:`from_string`; :data:`GRAMMAR` lists the forms.

Reference: Franceschi, Donini, Frasconi, Pontil (2017) *Forward and Reverse Gradient-Based
Hyperparameter Optimization*; Franceschi et al. (2018) *A Bridge Between Hyperparameter
Optimization and Learning-to-learn*; Shaban et al. (2019) *Truncated Back-propagation for
Bilevel Optimization*; Pedregosa (2016), Lorraine et al. (2020) for implicit differentiation.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.func import grad_and_value, jvp, vmap

from bilevel import _tree as T
from bilevel._engine import InnerState, Run, SolveInfo, check_loss, check_state_params, probe_captured, unroll
from bilevel._memory import ForwardMemory, activation_bytes, available_memory, fmt_bytes, nbytes
from bilevel._tree import Params
from bilevel.linsolve import CG, Exact, FixedPoint, LinearSolveInfo, LinearSolver, Neumann

Condition = Callable[[Params, Params, Any], Params]


class Strategy:
    """Base class of hypergradient strategies (see the module docstring).

    ``str(strategy)`` is the text form read back by :func:`from_string` for the built-in
    strategies; one that has none (a custom class, or one holding a Python callable) falls back
    to its repr, and :func:`to_string` refuses it.
    """

    #: whether the strategy produces a derivative at all (False only for NoInner).
    differentiable: bool = True

    def validate(self, steps: int) -> None:
        """Check the strategy against the number of steps of this call."""

    def run(self, run: Run) -> tuple[InnerState, Params]:
        """Advance the dynamics for ``run.steps`` steps; return the final state and w_T."""
        raise NotImplementedError

    def __repr__(self) -> str:  # dataclasses override this
        return f"{type(self).__name__}()"


def _detach_state(run: Run) -> Any:
    return T.detach(run.state0)


@dataclass(frozen=True, repr=True)
class Reverse(Strategy):
    """Reverse-mode differentiation through the whole unrolled trajectory (exact).

    Memory grows linearly with the number of steps T (every intermediate state is kept).
    Reference: Franceschi et al. (2017), §3 (reverse-HG); Maclaurin et al. (2015).
    """

    def __str__(self) -> str:
        return "reverse"

    def run(self, run: Run) -> tuple[InnerState, Params]:
        state = run.state0 if run.params0 is not None else _detach_state(run)
        return _finish(run, unroll(run, state, run.t0, run.t_end, "graph"))


class _Segment(torch.autograd.Function):
    """Steps t0+1..t1 of the dynamics, recomputed with a graph during backward (internal)."""

    @staticmethod
    def forward(ctx: Any, run: Run, t0: int, t1: int, spec: Any, n_state: int, hp_keys: list[str], *inputs: Tensor) -> Any:  # type: ignore[override]
        ctx.run, ctx.t0, ctx.t1, ctx.spec, ctx.n_state, ctx.hp_keys = run, t0, t1, spec, n_state, hp_keys
        ctx.rng = _rng_state(inputs)
        ctx.save_for_backward(*inputs)
        state = T.tree_unflatten([x.detach() for x in inputs[:n_state]], spec)
        out, out_spec = T.tree_flatten(unroll(run, state, t0, t1, "nograd"))
        ctx.out_spec = out_spec
        return tuple(out)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grad_out: Tensor) -> Any:
        inputs = ctx.saved_tensors
        xs = [x.detach().requires_grad_(x.requires_grad) for x in inputs]
        run = dataclasses.replace(ctx.run, hparams={**ctx.run.hparams_detached(), **dict(zip(ctx.hp_keys, xs[ctx.n_state:]))})
        with torch.enable_grad(), _restore_rng(ctx.rng):
            out = T.tree_flatten(unroll(run, T.tree_unflatten(xs[: ctx.n_state], ctx.spec), ctx.t0, ctx.t1, "graph"))[0]
        pairs = [(o, g) for o, g in zip(out, grad_out) if o.requires_grad]
        wrt = [x for x in xs if x.requires_grad]
        grads = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True) if pairs and wrt else [])
        result = [next(grads) if x.requires_grad else None for x in xs]
        return (None, None, None, None, None, None, *result)


def _rng_state(tensors: tuple[Tensor, ...]) -> tuple[Tensor, Tensor | None]:
    cuda = any(x.is_cuda for x in tensors) and torch.cuda.is_available()
    return torch.get_rng_state(), (torch.cuda.get_rng_state() if cuda else None)


class _restore_rng:
    """Replay the RNG state of a segment's first pass (dropout etc. recompute identically)."""

    def __init__(self, state: tuple[Tensor, Tensor | None]) -> None:
        self.state = state

    def __enter__(self) -> None:
        self.saved = _rng_state(()) if self.state[1] is None else (torch.get_rng_state(), torch.cuda.get_rng_state())
        torch.set_rng_state(self.state[0])
        if self.state[1] is not None:
            torch.cuda.set_rng_state(self.state[1])

    def __exit__(self, *exc: Any) -> None:
        torch.set_rng_state(self.saved[0])
        if self.saved[1] is not None:
            torch.cuda.set_rng_state(self.saved[1])


@dataclass(frozen=True, repr=True)
class Checkpointed(Strategy):
    """Exact reverse mode with checkpointing: store the state every ``every`` steps only.

    Each segment of ``every`` steps runs without recording; during the backward pass it is
    recomputed with a graph from its stored input state and back-propagated, trading one extra
    forward pass for memory O(T/every + every) instead of O(T) (Griewank & Walther 2008,
    ch. 12). Random operations are replayed with the segment's RNG state. Like Forward and
    Implicit, it differentiates with respect to ``hparams`` and ``params0`` only (tensors that
    require grad inside ``batch`` or a closure are refused); the hypergradient itself is not
    differentiable again.

    Args:
        every: segment length in steps (≥ 1); about sqrt(T) minimises memory.
    """

    every: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"Checkpointed(every=...) must be an integer >= 1, got {self.every!r}")

    def __str__(self) -> str:
        return f"checkpointed:{self.every}"

    def run(self, run: Run) -> tuple[InnerState, Params]:
        state = run.state0 if run.params0 is not None else _detach_state(run)
        probe_captured(run, "Checkpointed()")
        hp_keys = [k for k, v in run.hparams.items() if v.requires_grad]
        hp_vals = [run.hparams[k] for k in hp_keys]
        t = run.t0
        while t < run.t_end:
            t_next = min(t + self.every, run.t_end)
            leaves, spec = T.tree_flatten(state)
            out = _Segment.apply(run, t, t_next, spec, len(leaves), hp_keys, *leaves, *hp_vals)
            state = T.tree_unflatten(list(out), T.tree_flatten(state)[1])
            t = t_next
        return _finish(run, state)


@dataclass(frozen=True, repr=True)
class Truncated(Strategy):
    """Truncated back-propagation: differentiate through the last ``k`` steps only.

    The first T − k steps run without recording; s_{T−k} is treated as a constant, so
    ``params0`` receives no gradient unless k = T (then this equals :class:`Reverse`).

    Args:
        k: number of final steps to back-propagate through (1 ≤ k ≤ steps).

    Reference: Shaban, Cheng, Hatch, Boots (2019), *Truncated Back-propagation for Bilevel
    Optimization*.
    """

    k: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"Truncated(k) needs an integer k >= 1, got {self.k!r}")

    def __str__(self) -> str:
        return f"truncated:{self.k}"

    def validate(self, steps: int) -> None:
        if self.k > steps:
            raise ValueError(f"Truncated(k={self.k}) needs k <= steps, got steps={steps}")

    def run(self, run: Run) -> tuple[InnerState, Params]:
        split = run.t_end - self.k
        state = _detach_state(run) if (split > run.t0 or run.params0 is None) else run.state0
        if split > run.t0:
            state = T.detach(unroll(run, state, run.t0, split, "nograd"))
        return _finish(run, unroll(run, state, split, run.t_end, "graph"))


@dataclass(frozen=True, repr=True)
class FirstOrder(Strategy):
    """First-order approximation: inner gradients g_t are constants (no second derivatives).

    w_T still depends on w_0 (d w_T / d w_0 = I for gradient descent) and on coefficients of
    the dynamics (e.g. Meta-SGD's step sizes), but not through g_t. This is first-order MAML
    (Finn et al. 2017, §5.2).
    """

    def __str__(self) -> str:
        return "first-order"

    def run(self, run: Run) -> tuple[InnerState, Params]:
        state = run.state0 if run.params0 is not None else _detach_state(run)
        return _finish(run, unroll(run, state, run.t0, run.t_end, "first_order"))


@dataclass(frozen=True, repr=True)
class NoInner(Strategy):
    """d w_T / d λ = 0: w_T is returned as a constant.

    Only the explicit dependence of the outer loss on λ remains — the "Approx" variant of
    Franceschi et al. (2018), Appendix A. Also the cheapest way to adapt at test time.
    """

    differentiable = False

    def __str__(self) -> str:
        return "no-inner"

    def run(self, run: Run) -> tuple[InnerState, Params]:
        return _finish(run, T.detach(unroll(run, _detach_state(run), run.t0, run.t_end, "nograd")))


def _finish(run: Run, state: Any, params: Params | None = None, tangents: Any = None, keys: tuple[str, ...] = (),
            scale: float | None = None) -> tuple[InnerState, Params]:
    """Package the final state; ``params`` overrides w_T (linked outputs of Forward/Implicit).

    ``scale`` is Implicit's optimality scale; other strategies pass the incoming one through.
    """
    if params is None:
        params = run.dynamics.params(state)
    elif hasattr(state, "_replace") and hasattr(state, "params"):
        state = state._replace(params=params)
    return InnerState(state, run.t_end, tangents, keys, run.optimality_scale0 if scale is None else scale), params


_NOTHING = (
    "{name} differentiates with respect to hparams (and params0) only, and none of hparams {keys} requires "
    "grad; set requires_grad=True on the hyperparameters, or run under torch.no_grad() for adaptation only"
)


def _diff_inputs(run: Run, strategy: str, *, with_params0: bool) -> tuple[list[str], list[str]]:
    hp_keys = [k for k, v in run.hparams.items() if v.requires_grad]
    p0_keys: list[str] = []
    if with_params0 and run.params0 is not None:
        p0_keys = [k for k, v in run.params0.items() if v.requires_grad]
    return hp_keys, p0_keys


class _LinkByJacobian(torch.autograd.Function):
    """Attach precomputed outputs to inputs with a given vector-Jacobian product (internal)."""

    @staticmethod
    def forward(ctx: Any, vjp_fn: Callable[..., tuple[Tensor | None, ...]], outputs: tuple[Tensor, ...], *inputs: Tensor) -> Any:  # type: ignore[override]
        ctx.vjp_fn = vjp_fn
        return tuple(o.detach().clone() for o in outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grad_outputs: Tensor) -> Any:
        grads = ctx.vjp_fn(*grad_outputs)
        return (None, None, *grads)


#: ``Forward(max_memory=...)`` default: refuse when the estimate exceeds this fraction of the
#: memory available on the device (``/proc/meminfo`` MemAvailable, or free CUDA memory).
FORWARD_MEMORY_FRACTION = 0.5


class ForwardMemoryError(ValueError):
    """Forward()'s tangents would not fit under its memory cap; the message has the numbers.

    A ``ValueError`` (the option ``hypergrad=Forward()`` does not suit this problem size), raised
    before the first inner step; the command line reports it as a usage error.
    """


@dataclass(frozen=True, repr=False)
class Forward(Strategy):
    """Forward-mode (real-time recurrent) hypergradients with ``torch.func.jvp``.

    Propagates Z_t = d s_t / d λ alongside the dynamics: Z_t = (∂Φ_t/∂s) Z_{t−1} + ∂Φ_t/∂λ,
    batched over the m hyperparameter entries with ``torch.func.vmap``. Memory is independent of
    T (state + m tangents); cost is proportional to m, so use it for few hyperparameters
    (learning rates, momentum, schedules). Differentiates w.r.t. the ``hparams`` tensors that
    require grad and, on a fresh run, the ``params0`` tensors that require grad (each of their
    entries is a direction: a params0 expanded over B tasks counts B times).

    Memory guard: before the first step it estimates the peak memory — the one-hot seed tangents
    (m × |λ|, and m × |w_0| on a fresh run), the carried tangents Z_{t−1} and Z_t (2 × m × |s|), and
    the vmap working set of one step (per direction: the tangents of the inner loss's
    w-dependent saved activations, twice, plus one gradient; times ``chunk_size`` or m) — and
    raises :class:`ForwardMemoryError` if it exceeds ``max_memory``.

    The dynamics and the inner loss must be ``torch.func``-transformable (no in-place updates of
    captured tensors, e.g. BatchNorm running statistics: use batch statistics).

    Args:
        chunk_size: process the m tangent directions in chunks of this size (``vmap``'s
            ``chunk_size``) to bound the working set; ``None`` does all at once. It does not
            lower the carried tangents (2 × m × |s|).
        max_memory: the cap in bytes; ``"auto"`` (default) is half the memory available on the
            device when the run starts (Linux ``MemAvailable``, or free CUDA memory); ``None``
            disables the check.

    Reference: Franceschi et al. (2017), §3.2 (forward-HG, real-time HO); Williams & Zipser (1989).
    """

    chunk_size: int | None = None
    max_memory: int | str | None = "auto"

    def __post_init__(self) -> None:
        if self.chunk_size is not None and (isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            raise ValueError(f"Forward(chunk_size=...) must be None or an integer >= 1, got {self.chunk_size!r}")
        mm = self.max_memory
        if not (mm is None or mm == "auto" or (isinstance(mm, int) and not isinstance(mm, bool) and mm >= 1)):
            raise ValueError(f"Forward(max_memory=...) must be 'auto', None or a number of bytes >= 1, got {mm!r}")

    def __repr__(self) -> str:  # the repr of before max_memory existed, unless it is set
        extra = "" if self.max_memory == "auto" else f", max_memory={self.max_memory!r}"
        return f"Forward(chunk_size={self.chunk_size!r}{extra})"

    def __str__(self) -> str:
        opts = [] if self.chunk_size is None else [f"chunk={self.chunk_size}"]
        if self.max_memory != "auto":
            opts.append(f"max-memory={'none' if self.max_memory is None else _bytes_text(int(self.max_memory))}")
        return ":".join(["forward", *opts])

    def run(self, run: Run) -> tuple[InnerState, Params]:
        with warnings.catch_warnings():
            # torch's forward-AD decompositions are scripted on first use (a torch-internal FutureWarning)
            warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
            return self._run(run)

    def _memory_estimate(self, run: Run, hp_keys: list[str], p0_keys: list[str]) -> ForwardMemory:
        """The peak-memory estimate of this run (see the class docstring)."""
        m = sum(run.hparams[k].numel() for k in hp_keys) + sum(run.params0[k].numel() for k in p0_keys)  # type: ignore[index]
        itemsize = next(iter(run.params_ref.values())).element_size()
        seed_width = T.numel(run.hparams) + (T.numel(run.params0) if run.params0 is not None else 0)
        w0 = run.dynamics.params(run.state0)
        with _restore_rng(_rng_state(tuple(w0.values()))):  # the probe draws no random numbers of the run
            act = activation_bytes(run.problem.inner_loss, {k: v.detach() for k, v in w0.items()}, run.hparams_detached(),
                                   run.batch_at(run.t0 + 1))
        return ForwardMemory(m=m, state_bytes=nbytes(run.state0), seeds=m * seed_width * itemsize,
                             per_direction=2 * act + nbytes(w0), chunk=min(self.chunk_size or m, m))

    def _check_memory(self, run: Run, hp_keys: list[str], p0_keys: list[str]) -> None:
        if self.max_memory is None:
            return
        est = self._memory_estimate(run, hp_keys, p0_keys)
        device = next(iter(run.params_ref.values())).device
        if self.max_memory == "auto":
            avail, source = available_memory(device)
            if avail is None:
                return
            cap = int(avail * FORWARD_MEMORY_FRACTION)
            cap_text = f"max_memory='auto': {FORWARD_MEMORY_FRACTION:g} × {fmt_bytes(avail)} available ({source})"
        else:
            cap = int(self.max_memory)
            cap_text = f"max_memory={self.max_memory}"
        if est.total() <= cap:
            return
        sizes = ", ".join(f"hparams[{k!r}]: {run.hparams[k].numel():,}" for k in hp_keys)
        sizes += "".join(f", params0[{k!r}]: {run.params0[k].numel():,}" for k in p0_keys)  # type: ignore[index]
        lines = [
            f"Forward(): the forward-mode tangents need an estimated {fmt_bytes(est.total())}, above the cap of "
            f"{fmt_bytes(cap)} ({cap_text}).",
            f"m = {est.m:,} differentiated entries ({sizes.lstrip(', ')}) × a dynamics state of "
            f"{fmt_bytes(est.state_bytes)}: carried tangents {fmt_bytes(est.tangents)}, held twice during a step; "
            f"one-hot seeds {fmt_bytes(est.seeds)}; vmap working set {fmt_bytes(est.per_direction)} per direction × "
            f"{est.chunk:,} directions.",
            "Use Reverse() or Checkpointed(k): their memory does not grow with m (cost ∝ T instead).",
        ]
        best = est.best_chunk(cap)
        if best is not None and best < est.chunk:
            lines.append(f"Forward(chunk_size={best}) lowers the estimate to {fmt_bytes(est.total(best))} (it bounds the "
                         "working set; the carried tangents stay).")
        else:
            lines.append(f"A chunk_size does not help: the seeds and carried tangents alone need "
                         f"{fmt_bytes(est.seeds + 2 * est.tangents)}.")
        expanded = [k for k in p0_keys if 0 in run.params0[k].stride() and run.params0[k].numel() > 1]  # type: ignore[index]
        if expanded:
            lines.append(f"params0 {expanded} are expanded views (stride 0): every copy is a direction. If they stack "
                         "independent tasks, run Forward per task (memory falls by the number of tasks squared).")
        lines.append("Forward(max_memory=None) skips this check; Forward(max_memory=BYTES) sets another cap.")
        raise ForwardMemoryError(" ".join(lines))

    def _run(self, run: Run) -> tuple[InnerState, Params]:
        hp_keys, p0_keys = _diff_inputs(run, "Forward()", with_params0=True)
        hp = run.hparams_detached()
        probe_captured(run, "Forward()")
        if not hp_keys and not p0_keys:
            raise ValueError(_NOTHING.format(name="Forward()", keys=list(run.hparams)))
        self._check_memory(run, hp_keys, p0_keys)
        sizes = [run.hparams[k].numel() for k in hp_keys] + [run.params0[k].numel() for k in p0_keys]  # type: ignore[index]
        m = sum(sizes)
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]

        def seed(x: Tensor, offset: int) -> Tensor:
            """The one-hot tangents of x's entries: directions offset..offset+n−1, shaped [m, *x.shape]."""
            s = torch.zeros((m, x.numel()), dtype=x.dtype, device=x.device)
            idx = torch.arange(x.numel(), device=x.device)
            s[idx + offset, idx] = 1
            return s.reshape(m, *x.shape)

        h_tan = {k: torch.zeros((m, *v.shape), dtype=v.dtype, device=v.device) for k, v in hp.items()}
        for k, off in zip(hp_keys, offsets[: len(hp_keys)]):
            h_tan[k] = seed(hp[k], off)
        vmap_kw: dict[str, Any] = {"randomness": "same", "chunk_size": self.chunk_size}

        # private copies: torch.func writes into its primals, which may be expanded views
        state = T.tree_map(lambda x: x.detach().clone() if isinstance(x, Tensor) else x, run.state0)
        if run.params0 is not None:
            p0 = {k: v.detach().clone() for k, v in run.params0.items()}
            p_tan = {k: torch.zeros((m, *v.shape), dtype=v.dtype, device=v.device) for k, v in p0.items()}
            for k, off in zip(p0_keys, offsets[len(hp_keys):]):
                p_tan[k] = seed(p0[k], off)

            def init_tangent(pt: Params, ht: Params) -> Any:
                return jvp(lambda p, h: run.dynamics.init(p, h), (p0, hp), (pt, ht))[1]

            with torch.no_grad():
                z = vmap(init_tangent, **vmap_kw)(p_tan, h_tan)
            del p_tan
        else:
            if tuple(hp_keys) != tuple(run.tangent_keys0) or run.tangents0 is None:
                raise ValueError(
                    "Forward(): continuing from an InnerState needs the tangents of the same hparams; "
                    f"the state carries {list(run.tangent_keys0)}, hparams requiring grad are {hp_keys}"
                )
            z = run.tangents0

        for t in range(run.t0 + 1, run.t_end + 1):
            batch = run.batch_at(t)

            def phi(s: Any, h: Params, _t: int = t, _batch: Any = batch) -> tuple[Any, Tensor]:
                w = run.dynamics.params(s)
                g, loss = grad_and_value(lambda w_: run.problem.inner_loss(w_, h, _batch))(w)
                return run.dynamics.step(s, g, h, t=_t, loss=loss), loss

            def push(zs: Any, zh: Params, _phi: Callable[..., Any] = phi, _s: Any = state) -> Any:
                return jvp(_phi, (_s, hp), (zs, zh))

            with torch.no_grad():
                try:
                    (state, loss), (z, _) = self._push(push, z, h_tan, m)
                except RuntimeError as e:
                    if "ZeroTensors are immutable" not in str(e):
                        raise
                    raise RuntimeError(
                        "Forward(): torch cannot forward-differentiate the backward pass of an operation in "
                        "inner_loss (torch raised 'ZeroTensors are immutable'; in torch 2.14 this happens with "
                        "F.mse_loss). Write that term with elementary operations, e.g. ((pred - y) ** 2).mean(), "
                        "or use Reverse()/Checkpointed()."
                    ) from e
            check_loss(loss, t, run.t_end, run.check_finite)
            check_state_params(run, state, t)

        # attach w_T to the graph with vjp  v ↦ Z_Tᵀ v
        w_final = run.dynamics.params(state)
        keys = list(w_final)
        z_w = run.dynamics.params(z)
        inputs = [run.hparams[k] for k in hp_keys] + [run.params0[k] for k in p0_keys]  # type: ignore[index]

        def vjp_fn(*gw: Tensor) -> tuple[Tensor, ...]:
            g = sum((z_w[k].reshape(m, -1) @ v.reshape(-1).to(z_w[k].dtype)) for k, v in zip(keys, gw))
            return tuple(p.reshape(x.shape).to(x.dtype) for p, x in zip(torch.split(g, sizes), inputs))

        outs = _LinkByJacobian.apply(vjp_fn, tuple(w_final[k] for k in keys), *inputs)
        n_hp = sum(sizes[: len(hp_keys)])
        z_hp = T.tree_map(lambda x: x[:n_hp], z) if p0_keys else z
        return _finish(run, state, dict(zip(keys, outs)), z_hp, tuple(hp_keys))

    def _push(self, push: Callable[..., Any], z: Any, h_tan: Params, m: int) -> Any:
        """vmap ``push`` over the m tangent directions (in chunks), sharing the primal output.

        Chunk results are written into one preallocated output (no list + concatenation, whose
        peak would hold the new tangents twice).
        """
        chunk = self.chunk_size or m
        if chunk >= m:
            return vmap(push, out_dims=(None, 0), randomness="same")(z, h_tan)
        primal, out_leaves, spec = None, None, None
        for start in range(0, m, chunk):
            zc = T.tree_map(lambda x: x[start : start + chunk], z)
            hc = {k: v[start : start + chunk] for k, v in h_tan.items()}
            primal, tc = vmap(push, out_dims=(None, 0), randomness="same")(zc, hc)
            leaves, spec = T.tree_flatten(tc)
            if out_leaves is None:
                out_leaves = [x.new_empty((m, *x.shape[1:])) for x in leaves]
            for dst, src in zip(out_leaves, leaves):
                dst[start : start + src.shape[0]].copy_(src)
        return primal, T.tree_unflatten(out_leaves, spec)


def gradient_condition(problem_inner_loss: Callable[[Params, Params, Any], Tensor]) -> Condition:
    """The stationarity condition F(w, λ) = ∇_w L(w, λ) of the inner objective (internal default)."""

    def condition(params: Params, hparams: Params, batch: Any) -> Params:
        loss = problem_inner_loss(params, hparams, batch)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True, allow_unused=True)
        return {k: (g if g is not None else torch.zeros_like(v)) for (k, v), g in zip(params.items(), grads)}

    return condition


def fixed_point_condition(phi: Callable[[Params, Params, Any], Params]) -> Condition:
    """The fixed-point condition F(w, λ) = w − Φ(w, λ) of a map Φ(params, hparams, batch) -> params.

    Use with :class:`bilevel.linsolve.FixedPoint` to obtain the classical fixed-point
    hypergradient u ← b + (∂Φ/∂w)ᵀ u, e.g. with Φ one gradient step w − η∇L(w, λ).
    """

    def condition(params: Params, hparams: Params, batch: Any) -> Params:
        out = phi(params, hparams, batch)
        T.check_like(params, out, "fixed-point map output")
        return {k: params[k] - out[k] for k in params}

    return condition


class InexactHypergradientWarning(RuntimeWarning):
    """Implicit(): w_T or the linear solve is not accurate to ``tol``; the message has both residuals."""


class InexactHypergradientError(ValueError):
    """Implicit(on_inexact="raise"): w_T or the linear solve is not accurate to ``tol``."""


_ON_INEXACT = ("warn", "raise", "ignore")


def _condition_norm(condition: Condition, params: Params, hparams: Params, batch: Any) -> float:
    """‖F(params, hparams, batch)‖ over all entries (no graph is kept)."""
    with torch.enable_grad():
        f = condition(T.detach_requires_grad(params), hparams, batch)
    T.check_like(params, f, "the optimality condition F(params, hparams, batch)")
    return float(sum(float((v.detach().double() ** 2).sum()) for v in f.values()) ** 0.5)


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.inf


_INTERNAL_DIRS = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.abspath(__file__)) + os.sep)


def _warn_outside(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the first frame outside torch and bilevel (the user's call)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level if frame is not None else 2)


@dataclass(frozen=True, repr=False)
class Implicit(Strategy):
    """Implicit differentiation of an optimality condition F(w, λ) = 0 at the returned w_T.

    By the implicit function theorem, d w*/d λ = −(∂F/∂w)⁻¹ ∂F/∂λ. The backward pass solves
    (∂F/∂w)ᵀ u = ∂E/∂w with ``solver`` using only vector-Jacobian (Hessian-vector) products and
    returns −(∂F/∂λ)ᵀ u. The inner run itself is not recorded, so memory is independent of T;
    the result is exact only when w_T solves F = 0 and the linear solve is exact.

    Convergence certificate: both conditions are measured on every call.

    * optimality: r_opt = ‖F(w_T, λ)‖ / ‖F(w_0, λ)‖, the fraction of the optimality residual left
      after the T inner steps, with w_0 the start of the run (when the run continues from an
      :class:`InnerState`, the scale is the one that state carries: ‖F(w_0, λ_0)‖ at the cold
      start of the chain, so warm-started outer loops are measured against their first start).
      It is scale-free (multiplying the inner loss by c changes nothing) and needs no knowledge
      of the solution; its cost is two evaluations of F. For a strongly convex inner loss,
      ‖w_T − w*‖ ≤ κ · r_opt · ‖w_0 − w*‖ (κ = condition number of ∂F/∂w), so the hypergradient's
      relative error is of order κ · r_opt. A run that starts at a converged point has a tiny
      scale: continue from its InnerState instead, or set ``atol``.
    * linear solve: r_lin = ‖A u − b‖ / ‖b‖ of the backward pass (A = (∂F/∂w)ᵀ, b = ∂E/∂w).

    If r_opt > ``tol`` (and ‖F(w_T, λ)‖ > ``atol``) or r_lin > ``tol``, the backward pass warns
    (:class:`InexactHypergradientWarning`, default), raises (:class:`InexactHypergradientError`)
    or stays silent, as ``on_inexact`` says; the message holds both numbers and the remedy. The
    numbers are returned by ``solve(..., return_info=True)`` (:class:`bilevel.SolveInfo`) and
    :func:`bilevel.hypergradient`. A diverging Neumann/FixedPoint solve always raises
    :class:`bilevel.linsolve.DivergenceError`.

    Args:
        solver: a linear solver from :mod:`bilevel.linsolve` (``CG``, ``Neumann``, ``FixedPoint``,
            ``Exact``). ``CG`` needs ∂F/∂w symmetric positive definite (true for the default
            condition of a strongly convex inner loss).
        condition: F(params, hparams, batch) -> dict shaped like params. Default: the gradient
            ∇_w inner_loss (stationarity). See also :func:`fixed_point_condition`.
        batch: the data on which the condition is evaluated. Required when ``solve`` receives a
            callable batch (mini-batches); defaults to the ``solve`` batch otherwise.
        tol: the largest acceptable relative residual, for both r_opt and r_lin (default 1e-3).
        atol: ‖F(w_T, λ)‖ at or below this absolute value is accepted whatever r_opt (default 0).
        on_inexact: ``"warn"`` (default), ``"raise"`` or ``"ignore"``.
        warm_start: start each linear solve from the previous outer step's solution u, carried by
            :func:`bilevel.hypergradient` (``return_state=True``) or passed to
            ``solve(..., linsolve_init=u)``: AmIGO's and SOBA's warm start, which removes the
            fixed per-step bias of a few solver iterations as the outer loop converges.

    Reference: Pedregosa (2016), *Hyperparameter optimization with approximate gradient*;
    Lorraine et al. (2020); Rajeswaran et al. (2019) *Meta-Learning with Implicit Gradients*;
    Arbel & Mairal (2022) *Amortized implicit differentiation for stochastic bilevel optimization*
    (warm starts).
    """

    solver: LinearSolver = field(default_factory=CG)
    condition: Condition | None = None
    batch: Any = field(default=None, repr=False)
    tol: float = 1e-3
    atol: float = 0.0
    on_inexact: str = "warn"
    warm_start: bool = False

    def __repr__(self) -> str:
        extra = ", condition=..." if self.condition is not None else ""
        extra += ", batch=..." if self.batch is not None else ""
        for name in ("tol", "atol", "on_inexact", "warm_start"):
            value, default = getattr(self, name), _IMPLICIT_DEFAULTS[name]
            if value != default:
                extra += f", {name}={value!r}"
        return f"Implicit({self.solver!r}{extra})"

    def __str__(self) -> str:
        if self.condition is not None or self.batch is not None or type(self.solver) not in _SOLVERS.values():
            return repr(self)
        opts = []
        if self.tol != _IMPLICIT_DEFAULTS["tol"]:
            opts.append(f"tol={float(self.tol)!r}")
        if self.atol != _IMPLICIT_DEFAULTS["atol"]:
            opts.append(f"atol={float(self.atol)!r}")
        if self.on_inexact != _IMPLICIT_DEFAULTS["on_inexact"]:
            opts.append(f"on-inexact={self.on_inexact}")
        if self.warm_start:
            opts.append("warm-start")
        return ":".join([f"implicit-{self.solver}", *opts])

    def __post_init__(self) -> None:
        if isinstance(self.solver, type) and issubclass(self.solver, LinearSolver):
            raise TypeError(f"Implicit(solver=...) needs an instance, e.g. {self.solver.__name__}(), not the class")
        if not isinstance(self.solver, LinearSolver):
            raise TypeError(
                f"Implicit(solver=...) must be a linear solver (CG, Neumann, FixedPoint, Exact), got {type(self.solver).__name__}"
            )
        if self.condition is not None and not callable(self.condition):
            raise TypeError("Implicit(condition=...) must be callable (params, hparams, batch) -> dict")
        for name in ("tol", "atol"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
                raise ValueError(f"Implicit({name}=...) must be a finite number >= 0, got {v!r}")
        if self.on_inexact not in _ON_INEXACT:
            raise ValueError(f"Implicit(on_inexact=...) must be one of {list(_ON_INEXACT)}, got {self.on_inexact!r}")
        if not isinstance(self.warm_start, bool):
            raise TypeError(f"Implicit(warm_start=...) must be True or False, got {self.warm_start!r}")

    def run(self, run: Run) -> tuple[InnerState, Params]:
        if run.batch_is_fn and self.batch is None:
            raise ValueError(
                "Implicit(): solve() got a callable batch (mini-batches), so the optimality condition has no "
                "fixed data set; pass it explicitly: Implicit(solver, batch=full_training_batch)"
            )
        cond_batch = self.batch if self.batch is not None else run.batch
        hp_keys, p0_keys = _diff_inputs(run, "Implicit()", with_params0=True)
        if p0_keys and not hp_keys:
            raise ValueError(
                "Implicit(): only params0 requires grad, but the solution of the inner problem does not depend on "
                "its initialisation, so the implicit hypergradient w.r.t. params0 is zero. Make the dependence "
                "explicit (e.g. iMAML's proximal term with w0 in hparams) or use an unrolled strategy."
            )
        if p0_keys:
            warnings.warn(
                f"Implicit(): params0 keys {p0_keys} require grad but receive no gradient (the argmin does not "
                "depend on the initialisation).",
                stacklevel=3,
            )
        probe_captured(run, "Implicit()")
        if not hp_keys:
            raise ValueError(_NOTHING.format(name="Implicit()", keys=list(run.hparams)))
        state = T.detach(unroll(run, _detach_state(run), run.t0, run.t_end, "nograd"))
        if T.any_requires_grad(cond_batch):
            raise ValueError("Implicit(): the condition batch contains tensors that require grad; put them in hparams")
        w_star = run.dynamics.params(state)
        keys = list(w_star)
        inputs = [run.hparams[k] for k in hp_keys]
        hp_const = run.hparams_detached()
        condition = self.condition or gradient_condition(run.problem.inner_loss)
        solver = self.solver
        x0 = run.linsolve_x0

        # certificate, part 1: the optimality residual at w_T against the scale of the (cold) start
        # (the measurements draw no random numbers of the run: a stochastic condition replays the RNG)
        with _restore_rng(_rng_state(tuple(w_star.values()))):
            scale = run.optimality_scale0
            if scale is None:
                scale = _condition_norm(condition, {k: v.detach() for k, v in run.dynamics.params(run.state0).items()},
                                        hp_const, cond_batch)
            f_norm = _condition_norm(condition, w_star, hp_const, cond_batch)
        info = run.info if run.info is not None else SolveInfo(self, run.steps)
        info.optimality_norm, info.optimality_scale, info.optimality = f_norm, scale, _ratio(f_norm, scale)

        def vjp_fn(*gw: Tensor) -> tuple[Tensor, ...]:
            v = {k: g.to(w_star[k].dtype) for k, g in zip(keys, gw)}
            with torch.enable_grad():
                w = T.detach_requires_grad(w_star)
                h_in = {k: run.hparams[k].detach().requires_grad_(True) for k in hp_keys}
                f = condition(w, {**hp_const, **h_in}, cond_batch)
                T.check_like(w_star, f, "the optimality condition F(params, hparams, batch)")
                f_list = [f[k] for k in keys]
                w_list = [w[k] for k in keys]

                def matvec(u: Params) -> Params:
                    out = torch.autograd.grad(f_list, w_list, [u[k] for k in keys], retain_graph=True, allow_unused=True)
                    return {k: (o if o is not None else torch.zeros_like(u[k])) for k, o in zip(keys, out)}

                result = solver.solve(matvec, v) if x0 is None else solver.solve(matvec, v, x0)
                if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], LinearSolveInfo)):
                    raise TypeError(
                        f"{type(solver).__name__}.solve must return (solution, LinearSolveInfo) (see "
                        f"bilevel.linsolve.LinearSolver), got {type(result).__name__}"
                    )
                u, lin = result
                info.linear, info.linear_solution = lin, {k: x.detach() for k, x in u.items()}
                self._certify(info, carried=run.optimality_scale0 is not None)
                g_h = torch.autograd.grad(f_list, list(h_in.values()), [-u[k] for k in keys], allow_unused=True)
            return tuple((g if g is not None else torch.zeros_like(x)) for g, x in zip(g_h, inputs))

        outs = _LinkByJacobian.apply(vjp_fn, tuple(w_star[k] for k in keys), *inputs)
        return _finish(run, state, dict(zip(keys, outs)), scale=scale)

    def _certify(self, info: SolveInfo, *, carried: bool) -> None:
        """Warn or raise, as ``on_inexact`` says, when either residual exceeds ``tol``."""
        if self.on_inexact == "ignore":
            return
        opt, lin = info.optimality, info.linear
        opt_bad = not (opt <= self.tol or info.optimality_norm <= self.atol)  # NaN counts as bad
        lin_bad = not (lin.residual <= self.tol)
        if not (opt_bad or lin_bad):
            return
        flag = {True: "ABOVE tol", False: "ok"}
        parts = [
            f"{self!r}: the implicit hypergradient is inexact (tol={self.tol:g}).",
            f"Optimality residual ‖F(w_T, λ)‖/‖F(w_0, λ)‖ = {opt:.3e} ({flag[opt_bad]}; ‖F(w_T, λ)‖ = "
            f"{info.optimality_norm:.3e}, scale {info.optimality_scale:.3e}) after {info.steps} inner steps.",
            f"Linear-solve residual ‖A u − b‖/‖b‖ = {lin.residual:.3e} ({flag[lin_bad]}) after {lin.iterations} "
            f"{type(self.solver).__name__} iterations.",
        ]
        if opt_bad:
            parts.append(f"w_T does not solve F(w, λ) = 0: run more inner steps (steps > {info.steps}) or a faster "
                         "inner optimiser.")
            if not carried:
                parts.append("(The scale is ‖F(w_0, λ)‖ at this run's start; if it started at a converged point, pass "
                             "the InnerState of solve(..., return_state=True) instead, which keeps the scale of the "
                             "cold start, or set Implicit(..., atol=...).)")
        if lin_bad:
            parts.append(self._solver_advice(info.linear))
        parts.append("Implicit(..., on_inexact='ignore') silences this; 'raise' makes it an error.")
        message = " ".join(parts)
        if self.on_inexact == "raise":
            raise InexactHypergradientError(message)
        _warn_outside(message, InexactHypergradientWarning)

    def _solver_advice(self, lin: LinearSolveInfo) -> str:
        s = self.solver
        if lin.breakdown:
            return ("CG stopped at non-positive curvature (see its warning): ∂F/∂w is not positive definite at w_T, "
                    "so w_T is not a strict minimum. Run the inner problem to a minimum or add regularisation "
                    "(strong convexity); more CG iterations do not help.")
        warm = "" if self.warm_start else (
            " In an outer loop, Implicit(..., warm_start=True) with hypergradient(..., return_state=True) starts "
            "each solve from the previous solution."
        )
        if isinstance(s, CG):
            return f"More CG iterations (CG(maxiter > {s.maxiter})).{warm}"
        if isinstance(s, Neumann):
            return (f"More Neumann terms (maxiter > {s.maxiter}) or another alpha: the error decays like "
                    f"max|1 − α·λ|^K over the eigenvalues λ of A (alpha={s.alpha:g}: too small is slow, α·λ_max "
                    f"near 2 is slow too), or CG for a symmetric positive-definite A.{warm}")
        if isinstance(s, FixedPoint):
            return (f"More FixedPoint iterations (maxiter > {s.maxiter}); the iteration converges at the "
                    f"contraction rate of the fixed-point map.{warm}")
        return f"A more accurate linear solver than {s!r}.{warm}"


# ----------------------------------------------------------------------------- text form
_SOLVERS: dict[str, type[LinearSolver]] = {"cg": CG, "neumann": Neumann, "fixed-point": FixedPoint, "exact": Exact}
_IMPLICIT_DEFAULTS: dict[str, Any] = {"tol": 1e-3, "atol": 0.0, "on_inexact": "warn", "warm_start": False}

#: The text forms of :func:`from_string` (also the help of ``--hypergrad``).
GRAMMAR = """\
NAME[:ARG]...[:OPTION=VALUE]... (case-insensitive), one of
  reverse | first-order | no-inner
  truncated:K | checkpointed:K
  forward[:chunk=N][:max-memory=auto|none|BYTES]      (BYTES: 512M, 2GiB, 1073741824)
  implicit-cg:MAXITER[:STOP_TOL]
  implicit-neumann:MAXITER[:ALPHA]                    (ALPHA default 0.1)
  implicit-fixed-point:MAXITER[:STOP_TOL]
  implicit-exact[:MAX_SIZE]
  implicit                                            (= implicit-cg:20)
  implicit options: [:tol=X][:atol=X][:on-inexact=warn|raise|ignore][:warm-start]
examples: truncated:4, forward:chunk=8, implicit-neumann:50:0.5, implicit-cg:30:tol=1e-4:on-inexact=raise"""

_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def _bytes_text(n: int) -> str:
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _parse_bytes(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*([kmgt]?)(?:i?b)?", text)
    if match is None:
        raise ValueError(f"{text!r} is not a number of bytes (e.g. 512M, 2GiB, 1073741824), 'auto' or 'none'")
    return int(match.group(1)) * _UNITS[match.group(2)]


class _Spec:
    """One parsed text form: the name, positional arguments and options (internal)."""

    def __init__(self, text: str) -> None:
        self.text = text
        name, *parts = text.strip().lower().split(":")
        self.name = name.strip()
        self.args: list[str] = []
        self.options: dict[str, str | bool] = {}
        for part in parts:
            part = part.strip()
            if not part:
                raise self.error("an empty ':'-separated part")
            if "=" in part or part == "warm-start":
                key, _, value = part.partition("=")
                key = key.strip()
                if key in self.options:
                    raise self.error(f"option {key!r} given twice")
                self.options[key] = value.strip() if "=" in part else True
            elif self.options:
                raise self.error(f"the argument {part!r} comes after an option; arguments go first")
            else:
                self.args.append(part)

    def error(self, what: str) -> ValueError:
        return ValueError(f"hypergradient {self.text!r}: {what}.\nGrammar: {GRAMMAR}")

    def take(self, names: tuple[str, ...], required: int) -> list[str]:
        """The positional arguments, checked against their names (the first ``required`` must be there)."""
        if len(self.args) < required:
            raise self.error(f"{self.name} needs {' and '.join(names[:required])}, e.g. {self.name}:10")
        if len(self.args) > len(names):
            raise self.error(f"{self.name} takes at most {len(names)} argument(s) ({', '.join(names) or 'none'}), "
                             f"got {len(self.args)}")
        return self.args

    def only(self, allowed: tuple[str, ...]) -> None:
        extra = [k for k in self.options if k not in allowed]
        if extra:
            ok = ", ".join(allowed) if allowed else "none"
            raise self.error(f"unknown option {extra[0]!r} for {self.name} (options: {ok})")

    def number(self, value: str | bool, kind: type, what: str) -> Any:
        try:
            if isinstance(value, bool):
                raise ValueError
            return kind(value)
        except ValueError:
            raise self.error(f"{what} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None


def _parse(spec: _Spec) -> Strategy:
    simple = {"reverse": Reverse, "first-order": FirstOrder, "no-inner": NoInner}
    if spec.name in simple:
        spec.take((), 0)
        spec.only(())
        return simple[spec.name]()
    if spec.name in ("truncated", "checkpointed"):
        spec.only(())
        (k,) = spec.take(("K",), 1)
        return (Truncated if spec.name == "truncated" else Checkpointed)(spec.number(k, int, "K"))
    if spec.name == "forward":
        spec.take((), 0)
        spec.only(("chunk", "max-memory"))
        chunk = spec.options.get("chunk")
        mm = spec.options.get("max-memory", "auto")
        if isinstance(mm, bool):
            raise spec.error("max-memory needs a value")
        try:
            max_memory = None if mm == "none" else ("auto" if mm == "auto" else _parse_bytes(mm))
        except ValueError as e:
            raise spec.error(f"max-memory: {e}") from None
        return Forward(chunk_size=None if chunk is None else spec.number(chunk, int, "chunk"), max_memory=max_memory)
    if spec.name == "implicit" or spec.name.startswith("implicit-"):
        solver = _parse_solver(spec)
        spec.only(("tol", "atol", "on-inexact", "warm-start"))
        kw: dict[str, Any] = {}
        for key in ("tol", "atol"):
            if key in spec.options:
                kw[key] = spec.number(spec.options[key], float, key)
        if "on-inexact" in spec.options:
            kw["on_inexact"] = spec.options["on-inexact"]
            if kw["on_inexact"] not in _ON_INEXACT:
                raise spec.error(f"on-inexact must be one of {', '.join(_ON_INEXACT)}, got {kw['on_inexact']!r}")
        if spec.options.get("warm-start") is not None:
            if spec.options["warm-start"] is not True:
                raise spec.error("warm-start is a flag without a value (write :warm-start)")
            kw["warm_start"] = True
        return Implicit(solver, **kw)
    if "(" in spec.text:
        raise spec.error(
            "this looks like the repr of a strategy object. Strategies that hold a Python callable (Implicit with "
            "condition= or batch=) or that are custom classes have no text form: construct them in Python"
        )
    raise spec.error(f"unknown hypergradient {spec.name!r}")


def _parse_solver(spec: _Spec) -> LinearSolver:
    kind = spec.name[len("implicit-"):] if spec.name != "implicit" else ""
    if kind == "":
        spec.take((), 0)
        return CG(maxiter=20)
    if kind == "cg":
        a = spec.take(("MAXITER", "STOP_TOL"), 1)
        return CG(spec.number(a[0], int, "MAXITER"), *([spec.number(a[1], float, "STOP_TOL")] if len(a) > 1 else []))
    if kind == "neumann":
        a = spec.take(("MAXITER", "ALPHA"), 1)
        return Neumann(spec.number(a[0], int, "MAXITER"), *([spec.number(a[1], float, "ALPHA")] if len(a) > 1 else []))
    if kind == "fixed-point":
        a = spec.take(("MAXITER", "STOP_TOL"), 1)
        return FixedPoint(spec.number(a[0], int, "MAXITER"), *([spec.number(a[1], float, "STOP_TOL")] if len(a) > 1 else []))
    if kind == "exact":
        a = spec.take(("MAX_SIZE",), 0)
        return Exact(*([spec.number(a[0], int, "MAX_SIZE")] if a else []))
    raise spec.error(f"unknown linear solver {kind!r} (implicit-cg, implicit-neumann, implicit-fixed-point, implicit-exact)")


def from_string(spec: str) -> Strategy:
    """Parse a strategy written as text (CLI ``--hypergrad``, configuration and model files).

    The inverse of ``str(strategy)``: ``from_string(str(s)) == s`` for every strategy that has a
    text form (see :func:`to_string`). Forms (:data:`GRAMMAR`): ``reverse``, ``first-order``,
    ``no-inner``, ``truncated:K``, ``checkpointed:K``, ``forward[:chunk=N][:max-memory=…]``,
    ``implicit-cg:K[:STOP_TOL]``, ``implicit-neumann:K[:ALPHA]``, ``implicit-fixed-point:K[:STOP_TOL]``,
    ``implicit-exact[:MAX_SIZE]``, ``implicit`` (= ``implicit-cg:20``); implicit forms take the options
    ``tol=X``, ``atol=X``, ``on-inexact=warn|raise|ignore`` and the flag ``warm-start``.

    Raises:
        TypeError: ``spec`` is not a string.
        ValueError: naming the unknown form, option or bad number, followed by the whole grammar.
    """
    if not isinstance(spec, str):
        raise TypeError(f"a strategy string is expected, got {type(spec).__name__}")
    parsed = _Spec(spec)
    try:
        return _parse(parsed)
    except ValueError as e:
        if "Grammar:" in str(e):
            raise
        raise parsed.error(str(e)) from None  # a constructor's range check, e.g. Truncated(0)


def to_string(strategy: Strategy) -> str:
    """The text form of ``strategy`` for files and command lines; ``from_string`` reads it back.

    Raises:
        ValueError: the strategy has no text form: it holds a Python callable (``Implicit``'s
            ``condition`` or ``batch``), uses a custom linear solver, or is a custom class.
    """
    if not isinstance(strategy, Strategy):
        raise TypeError(f"a Strategy is expected, got {type(strategy).__name__}")
    reason = None
    if isinstance(strategy, Implicit):
        if strategy.condition is not None:
            reason = "it holds a Python callable (condition=...)"
        elif strategy.batch is not None:
            reason = "it holds data (batch=...)"
        elif type(strategy.solver) not in _SOLVERS.values():
            reason = f"its linear solver {type(strategy.solver).__name__} is not one of CG, Neumann, FixedPoint, Exact"
    text = str(strategy)
    if reason is None:
        try:
            if from_string(text) == strategy:
                return text
        except ValueError:
            pass
        reason = f"{type(strategy).__name__} is not a built-in strategy with a text form"
    raise ValueError(
        f"{strategy!r} cannot be written as text: {reason}. Save the settings it is built from and construct it "
        "in Python; text forms exist for the strategies of bilevel.hypergrad.GRAMMAR."
    )


__all__ = [
    "GRAMMAR",
    "Checkpointed",
    "Condition",
    "FirstOrder",
    "Forward",
    "ForwardMemoryError",
    "Implicit",
    "InexactHypergradientError",
    "InexactHypergradientWarning",
    "NoInner",
    "Reverse",
    "Strategy",
    "Truncated",
    "fixed_point_condition",
    "from_string",
    "to_string",
]
