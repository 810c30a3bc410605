"""Run ``bilevel.stochastic`` solvers inside benchopt's bilevel benchmark (benchopt/benchmark_bilevel).

The benchmark hands every solver JAX oracles ``f_inner(inner, outer, start, batch_size)`` and
``f_outer(...)`` (jitted, ``batch_size`` static). :class:`JaxOracles` wraps them as our
:class:`~bilevel.stochastic.Oracles`: gradients, Hessian-vector and cross products are jitted JAX
functions (``jax.grad``/``jax.vjp``, never a dense Hessian); tensors cross between torch and JAX
through DLPack, without copies. Batches are the benchmark's ``(start, batch_size)`` slices:
batch i starts at i·batch_size, drawn without replacement and reshuffled each epoch, as its
``minibatch_sampler``. Every JAX result is awaited (``block_until_ready``) inside the oracle, i.e.
inside benchopt's timed region.

Use inside a checkout of benchmark_bilevel: add the one-line solver file
``solvers/bilevel_torch.py``::

    from bilevel.stochastic.benchopt import Solver  # noqa: F401

then ``benchopt run . -s "bilevel-torch[solver=saba]" -d simulated``. Needs ``jax``, ``benchopt`` and
``torch`` in the same environment (the optional ``bench`` extra of this package).
"""
from __future__ import annotations

from typing import Any

import torch

from bilevel._tree import Params
from bilevel.stochastic._core import Batches, Oracles

_IN, _OUT = "inner", "outer"


def _to_torch(a: Any) -> torch.Tensor:
    return torch.from_dlpack(a)


def _to_jax(t: torch.Tensor) -> Any:
    import jax

    return jax.dlpack.from_dlpack(t.detach().contiguous())


class JaxOracles(Oracles):
    """benchmark_bilevel's JAX oracles as :class:`~bilevel.stochastic.Oracles` (zero-copy DLPack).

    Invariant: ``batch`` is the start index of a benchmark mini-batch; every method evaluates the
    jitted JAX oracle on ``(z, x, start)`` with the fixed batch sizes, awaits the result, and
    returns torch views of the JAX buffers (variables are ``{"inner": z}``, ``{"outer": x}``).

    Args:
        f_inner, f_outer: the benchmark's ``f(inner, outer, start, batch_size)``.
        batch_size_inner, batch_size_outer: the static batch sizes.
    """

    def __init__(self, f_inner: Any, f_outer: Any, batch_size_inner: int, batch_size_outer: int) -> None:
        import jax
        from functools import partial

        fi = partial(f_inner, batch_size=batch_size_inner)
        fo = partial(f_outer, batch_size=batch_size_outer)
        grad_in = jax.grad(fi, argnums=0)

        def hvp_cross(z: Any, x: Any, v: Any, start: Any) -> Any:
            g, vjp = jax.vjp(lambda zz, xx: grad_in(zz, xx, start), z, x)
            hv, cv = vjp(v)
            return g, hv, cv

        self._grad_in = jax.jit(grad_in)
        self._grad_in_both = jax.jit(jax.grad(fi, argnums=(0, 1)))
        self._grad_out = jax.jit(jax.grad(fo, argnums=(0, 1)))
        self._hvp_cross = jax.jit(hvp_cross)
        self._block = jax.block_until_ready

    def _run(self, fn: Any, *tensors: Any) -> tuple[torch.Tensor, ...]:
        out = self._block(fn(*[_to_jax(t) if isinstance(t, torch.Tensor) else t for t in tensors]))
        return tuple(_to_torch(o) for o in (out if isinstance(out, tuple) else (out,)))

    def inner_grad(self, inner: Params, outer: Params, batch: Any) -> Params:
        return {_IN: self._run(self._grad_in, inner[_IN], outer[_OUT], batch)[0]}

    def inner_grad_both(self, inner: Params, outer: Params, batch: Any) -> tuple[Params, Params]:
        gz, gx = self._run(self._grad_in_both, inner[_IN], outer[_OUT], batch)
        return {_IN: gz}, {_OUT: gx}

    def outer_grads(self, inner: Params, outer: Params, batch: Any) -> tuple[Params, Params]:
        fz, fx = self._run(self._grad_out, inner[_IN], outer[_OUT], batch)
        return {_IN: fz}, {_OUT: fx}

    def hvp_cross(self, inner: Params, outer: Params, v: Params, batch: Any, *, with_grad: bool = True,
                  with_hvp: bool = True) -> tuple[Params | None, Params | None, Params]:
        g, hv, cv = self._run(self._hvp_cross, inner[_IN], outer[_OUT], v[_IN], batch)
        return ({_IN: g} if with_grad else None), ({_IN: hv} if with_hvp else None), {_OUT: cv}


def benchmark_batches(n_samples: int, batch_size: int) -> Batches:
    """The benchmark's mini-batches: batch i is ``start = i·batch_size`` (the last one may be partial)."""
    n = (n_samples + batch_size - 1) // batch_size
    sizes = tuple(min(batch_size, n_samples - i * batch_size) for i in range(n))
    return Batches(lambda i: i * batch_size, n, sizes)


def _solver_class() -> type:
    from benchopt import BaseSolver
    from benchopt.stopping_criterion import SufficientProgressCriterion

    from bilevel.stochastic.solvers import SOLVERS

    class Solver(BaseSolver):  # type: ignore[misc,valid-type]
        """bilevel (PyTorch) stochastic solvers on the benchmark's JAX oracles (DLPack, no copies).

        Parameters: ``solver`` (soba, saba, amigo, stocbio, f2sa), ``step_size`` and ``outer_ratio``
        (``None``: our defaults), ``batch_size``, ``eval_freq`` (solver steps between callbacks),
        ``random_state`` (batch order).
        """

        name = "bilevel-torch"
        requirements = ["jax", "jaxlib", "torch"]
        stopping_criterion = SufficientProgressCriterion(patience=12_800, strategy="callback")
        parameters = {
            "solver": ["saba"],
            "step_size": [None],
            "outer_ratio": [None],
            "batch_size": [64],
            "eval_freq": [128],
            "random_state": [1],
        }

        @staticmethod
        def get_next(stop_val: int) -> int:
            return stop_val + 1

        def set_objective(self, f_inner: Any, f_outer: Any, n_inner_samples: int, n_outer_samples: int,
                          inner_var0: Any, outer_var0: Any) -> None:
            full = self.batch_size == "full"
            bi = n_inner_samples if full else int(self.batch_size)
            bo = n_outer_samples if full else int(self.batch_size)
            self.oracles = JaxOracles(f_inner, f_outer, bi, bo)
            self.inner_batches = benchmark_batches(n_inner_samples, bi)
            self.outer_batches = benchmark_batches(n_outer_samples, bo)
            kw = {k: getattr(self, k) for k in ("step_size", "outer_ratio") if getattr(self, k) is not None}
            self.algo = SOLVERS[self.solver](**kw)
            # private torch copies of the start (the benchmark's arrays stay untouched)
            self.inner0 = {_IN: _to_torch(inner_var0).clone()}
            self.outer0 = {_OUT: _to_torch(outer_var0).clone()}
            self.run_once(2)  # warm-up: JAX compiles every oracle outside the timed runs

        def run(self, callback: Any) -> None:
            state = self.algo.init(self.oracles, self.inner0, self.outer0, self.inner_batches, self.outer_batches,
                                   seed=self.random_state)
            self.state = state
            n = self.eval_freq
            while callback():
                for _ in range(n):
                    state = self.algo.step(state, self.oracles, self.inner_batches, self.outer_batches)
                self.state = state

        def get_result(self) -> dict[str, Any]:
            return {"inner_var": _to_jax(self.state.inner[_IN].clone()), "outer_var": _to_jax(self.state.outer[_OUT].clone())}

    return Solver


def __getattr__(name: str) -> Any:
    if name == "Solver":  # built lazily: benchopt is imported only when the benchmark asks for it
        return _solver_class()
    raise AttributeError(name)


__all__ = ["JaxOracles", "Solver", "benchmark_batches"]
