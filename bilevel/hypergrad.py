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

Reference: Franceschi, Donini, Frasconi, Pontil (2017) *Forward and Reverse Gradient-Based
Hyperparameter Optimization*; Franceschi et al. (2018) *A Bridge Between Hyperparameter
Optimization and Learning-to-learn*; Shaban et al. (2019) *Truncated Back-propagation for
Bilevel Optimization*; Pedregosa (2016), Lorraine et al. (2020) for implicit differentiation.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.func import grad_and_value, jvp, vmap

from bilevel import _tree as T
from bilevel._engine import InnerState, Run, check_loss, check_state_params, probe_captured, unroll
from bilevel._tree import Params
from bilevel.linsolve import CG, LinearSolver

Condition = Callable[[Params, Params, Any], Params]


class Strategy:
    """Base class of hypergradient strategies (see the module docstring)."""

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

    def run(self, run: Run) -> tuple[InnerState, Params]:
        return _finish(run, T.detach(unroll(run, _detach_state(run), run.t0, run.t_end, "nograd")))


def _finish(run: Run, state: Any, params: Params | None = None, tangents: Any = None, keys: tuple[str, ...] = ()) -> tuple[InnerState, Params]:
    """Package the final state; ``params`` overrides w_T (linked outputs of Forward/Implicit)."""
    if params is None:
        params = run.dynamics.params(state)
    elif hasattr(state, "_replace") and hasattr(state, "params"):
        state = state._replace(params=params)
    return InnerState(state, run.t_end, tangents, keys), params


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


@dataclass(frozen=True, repr=True)
class Forward(Strategy):
    """Forward-mode (real-time recurrent) hypergradients with ``torch.func.jvp``.

    Propagates Z_t = d s_t / d λ alongside the dynamics: Z_t = (∂Φ_t/∂s) Z_{t−1} + ∂Φ_t/∂λ,
    batched over the m hyperparameter entries with ``torch.func.vmap``. Memory is independent of
    T (state + m tangents); cost is proportional to m, so use it for few hyperparameters
    (learning rates, momentum, schedules). Differentiates w.r.t. the ``hparams`` tensors that
    require grad and, on a fresh run, the ``params0`` tensors that require grad.

    The dynamics and the inner loss must be ``torch.func``-transformable (no in-place updates of
    captured tensors, e.g. BatchNorm running statistics: use batch statistics).

    Args:
        chunk_size: process the m tangent directions in chunks of this size (``vmap``'s
            ``chunk_size``) to bound memory; ``None`` does all at once.

    Reference: Franceschi et al. (2017), §3.2 (forward-HG, real-time HO); Williams & Zipser (1989).
    """

    chunk_size: int | None = None

    def __post_init__(self) -> None:
        if self.chunk_size is not None and (isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            raise ValueError(f"Forward(chunk_size=...) must be None or an integer >= 1, got {self.chunk_size!r}")

    def run(self, run: Run) -> tuple[InnerState, Params]:
        with warnings.catch_warnings():
            # torch's forward-AD decompositions are scripted on first use (a torch-internal FutureWarning)
            warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
            return self._run(run)

    def _run(self, run: Run) -> tuple[InnerState, Params]:
        hp_keys, p0_keys = _diff_inputs(run, "Forward()", with_params0=True)
        hp = run.hparams_detached()
        probe_captured(run, "Forward()")
        if not hp_keys and not p0_keys:
            raise ValueError(_NOTHING.format(name="Forward()", keys=list(run.hparams)))
        sizes = [run.hparams[k].numel() for k in hp_keys] + [run.params0[k].numel() for k in p0_keys]  # type: ignore[index]
        m = sum(sizes)
        ref = next(iter(run.params_ref.values()))
        eye = torch.eye(m, dtype=ref.dtype, device=ref.device)
        blocks = list(torch.split(eye, sizes, dim=1))  # each [m, n_i]
        h_tan = {k: torch.zeros((m, *v.shape), dtype=v.dtype, device=v.device) for k, v in hp.items()}
        for k, blk in zip(hp_keys, blocks[: len(hp_keys)]):
            h_tan[k] = blk.reshape(m, *hp[k].shape).to(hp[k].dtype)
        vmap_kw: dict[str, Any] = {"randomness": "same", "chunk_size": self.chunk_size}

        # private copies: torch.func writes into its primals, which may be expanded views
        state = T.tree_map(lambda x: x.detach().clone() if isinstance(x, Tensor) else x, run.state0)
        if run.params0 is not None:
            p0 = {k: v.detach().clone() for k, v in run.params0.items()}
            p_tan = {k: torch.zeros((m, *v.shape), dtype=v.dtype, device=v.device) for k, v in p0.items()}
            for k, blk in zip(p0_keys, blocks[len(hp_keys):]):
                p_tan[k] = blk.reshape(m, *p0[k].shape).to(p0[k].dtype)

            def init_tangent(pt: Params, ht: Params) -> Any:
                return jvp(lambda p, h: run.dynamics.init(p, h), (p0, hp), (pt, ht))[1]

            with torch.no_grad():
                z = vmap(init_tangent, **vmap_kw)(p_tan, h_tan)
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
        """vmap ``push`` over the m tangent directions (in chunks), sharing the primal output."""
        chunk = self.chunk_size or m
        primal, tangents = None, []
        for start in range(0, m, chunk):
            zc = T.tree_map(lambda x: x[start : start + chunk], z)
            hc = {k: v[start : start + chunk] for k, v in h_tan.items()}
            primal, tc = vmap(push, out_dims=(None, 0), randomness="same")(zc, hc)
            tangents.append(tc)
        if len(tangents) == 1:
            return primal, tangents[0]
        flat = [T.tree_flatten(tc)[0] for tc in tangents]
        spec = T.tree_flatten(tangents[0])[1]
        return primal, T.tree_unflatten([torch.cat(parts, dim=0) for parts in zip(*flat)], spec)


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


@dataclass(frozen=True, repr=False)
class Implicit(Strategy):
    """Implicit differentiation of an optimality condition F(w, λ) = 0 at the returned w_T.

    By the implicit function theorem, d w*/d λ = −(∂F/∂w)⁻¹ ∂F/∂λ. The backward pass solves
    (∂F/∂w)ᵀ u = ∂E/∂w with ``solver`` using only vector-Jacobian (Hessian-vector) products and
    returns −(∂F/∂λ)ᵀ u. The inner run itself is not recorded, so memory is independent of T;
    the result is exact only when w_T solves F = 0 (run enough inner steps).

    Args:
        solver: a linear solver from :mod:`bilevel.linsolve` (``CG``, ``Neumann``, ``FixedPoint``,
            ``Exact``). ``CG`` needs ∂F/∂w symmetric positive definite (true for the default
            condition of a strongly convex inner loss).
        condition: F(params, hparams, batch) -> dict shaped like params. Default: the gradient
            ∇_w inner_loss (stationarity). See also :func:`fixed_point_condition`.
        batch: the data on which the condition is evaluated. Required when ``solve`` receives a
            callable batch (mini-batches); defaults to the ``solve`` batch otherwise.

    Reference: Pedregosa (2016), *Hyperparameter optimization with approximate gradient*;
    Lorraine et al. (2020); Rajeswaran et al. (2019) *Meta-Learning with Implicit Gradients*.
    """

    solver: LinearSolver = field(default_factory=CG)
    condition: Condition | None = None
    batch: Any = field(default=None, repr=False)

    def __repr__(self) -> str:
        extra = ", condition=..." if self.condition is not None else ""
        extra += ", batch=..." if self.batch is not None else ""
        return f"Implicit({self.solver!r}{extra})"

    def __post_init__(self) -> None:
        if isinstance(self.solver, type) and issubclass(self.solver, LinearSolver):
            raise TypeError(f"Implicit(solver=...) needs an instance, e.g. {self.solver.__name__}(), not the class")
        if not isinstance(self.solver, LinearSolver):
            raise TypeError(
                f"Implicit(solver=...) must be a linear solver (CG, Neumann, FixedPoint, Exact), got {type(self.solver).__name__}"
            )
        if self.condition is not None and not callable(self.condition):
            raise TypeError("Implicit(condition=...) must be callable (params, hparams, batch) -> dict")

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

                u = solver.solve(matvec, v)
                g_h = torch.autograd.grad(f_list, list(h_in.values()), [-u[k] for k in keys], allow_unused=True)
            return tuple((g if g is not None else torch.zeros_like(x)) for g, x in zip(g_h, inputs))

        outs = _LinkByJacobian.apply(vjp_fn, tuple(w_star[k] for k in keys), *inputs)
        return _finish(run, state, dict(zip(keys, outs)))


__all__ = [
    "Checkpointed",
    "Condition",
    "FirstOrder",
    "Forward",
    "Implicit",
    "NoInner",
    "Reverse",
    "Strategy",
    "Truncated",
    "fixed_point_condition",
    "from_string",
]


def from_string(spec: str) -> Strategy:
    """Parse a strategy written as text (CLI ``--hypergrad``, JSON configs).

    Forms: ``reverse``, ``first-order``, ``no-inner``, ``forward``, ``truncated:K``,
    ``checkpointed:K``, ``implicit`` (= ``implicit-cg:20``), ``implicit-cg:K``,
    ``implicit-neumann:K[:ALPHA]``, ``implicit-fixed-point:K``, ``implicit-exact``.

    Raises:
        ValueError: naming the unknown form or the bad number.
    """
    from bilevel.linsolve import Exact, FixedPoint, Neumann

    if not isinstance(spec, str):
        raise TypeError(f"a strategy string is expected, got {type(spec).__name__}")
    name, *args = spec.strip().lower().split(":")

    def number(i: int, kind: type, default: Any = None) -> Any:
        if i >= len(args):
            if default is None:
                raise ValueError(f"hypergradient {spec!r} needs a number: e.g. {name}:10")
            return default
        try:
            return kind(args[i])
        except ValueError:
            raise ValueError(f"hypergradient {spec!r}: {args[i]!r} is not a valid {kind.__name__}") from None

    simple = {"reverse": Reverse, "first-order": FirstOrder, "no-inner": NoInner, "forward": Forward}
    if name in simple and not args:
        return simple[name]()
    if name == "truncated":
        return Truncated(number(0, int))
    if name == "checkpointed":
        return Checkpointed(number(0, int))
    if name == "implicit" and not args:
        return Implicit(CG(maxiter=20))
    if name == "implicit-cg":
        return Implicit(CG(maxiter=number(0, int)))
    if name == "implicit-neumann":
        return Implicit(Neumann(maxiter=number(0, int), alpha=number(1, float, 0.1)))
    if name == "implicit-fixed-point":
        return Implicit(FixedPoint(maxiter=number(0, int)))
    if name == "implicit-exact" and not args:
        return Implicit(Exact())
    raise ValueError(
        f"unknown hypergradient {spec!r}; expected one of: reverse, first-order, no-inner, forward, truncated:K, "
        "checkpointed:K, implicit, implicit-cg:K, implicit-neumann:K[:ALPHA], implicit-fixed-point:K, implicit-exact"
    )


def to_string(strategy: Strategy) -> str:
    """The text form of ``strategy`` (inverse of :func:`from_string`); ValueError if it has none."""
    from bilevel.linsolve import Exact, FixedPoint, Neumann

    simple = {Reverse: "reverse", FirstOrder: "first-order", NoInner: "no-inner"}
    if type(strategy) in simple:
        text = simple[type(strategy)]
    elif isinstance(strategy, Forward) and strategy.chunk_size is None:
        text = "forward"
    elif isinstance(strategy, Truncated):
        text = f"truncated:{strategy.k}"
    elif isinstance(strategy, Checkpointed):
        text = f"checkpointed:{strategy.every}"
    elif isinstance(strategy, Implicit) and strategy.condition is None and strategy.batch is None:
        s = strategy.solver
        if isinstance(s, CG):
            text = f"implicit-cg:{s.maxiter}"
        elif isinstance(s, Neumann):
            text = f"implicit-neumann:{s.maxiter}:{s.alpha!r}"
        elif isinstance(s, FixedPoint):
            text = f"implicit-fixed-point:{s.maxiter}"
        elif isinstance(s, Exact):
            text = "implicit-exact"
        else:
            raise ValueError(f"{strategy!r} has no text form")
    else:
        raise ValueError(f"{strategy!r} has no text form (custom condition, batch or options)")
    if from_string(text) != strategy:
        raise ValueError(f"{strategy!r} has no text form that parses back to it")
    return text


__all__.append("to_string")
