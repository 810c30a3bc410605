"""Stochastic bilevel solvers (SOBA, SABA, AmIGO, StocBiO, F2SA) on a small simulated quadratic.

The quadratic's value function is quadratic, so ‖∇h(x)‖² and x* are exact closed forms
(bilevel.stochastic.problems.simulated_quadratic). Tolerances are documented per test: the
deterministic (full-batch) runs must reach the closed-form solution to near machine precision
except where the algorithm itself is biased (StocBiO's truncated Neumann series, F2SA's finite
penalty λ), where the test checks the size of that bias.
"""
from __future__ import annotations

import pytest
import torch

from bilevel.stochastic import F2SA, SABA, SOBA, AmIGO, Batches, StocBiO, run, simulated_quadratic


@pytest.fixture(scope="module")
def quad():
    # 128 samples per level, dim z = 10, dim x = 5: λ_min(∇²h) ≈ 0.043, λ_max ≈ 1.18 (seed 0)
    return simulated_quadratic(n_inner=128, n_outer=128, dim_inner=10, dim_outer=5, seed=0, dtype=torch.float64)


def _final(bench, solver, batch_size, steps, eval_every=None, seed=0):
    tr = run(solver, bench, batch_size=batch_size, max_steps=steps, max_time=1e9,
             eval_every=eval_every or steps, seed=seed)
    assert tr.stopped == "steps"
    return tr


def test_closed_form_is_stationary(quad):
    m = quad.metric({"z": quad.info["z_star"]}, {"x": quad.info["x_star"]})
    assert m["value"] < 1e-24 and m["inner_distance"] == 0.0
    start = quad.metric(quad.inner0, quad.outer0)
    assert start["value"] > 1.0


def test_saba_converges_with_minibatches(quad):
    # SAGA-type variance reduction: constant step, 8 batches of 16 samples, linear convergence.
    tr = _final(quad, SABA(step_size=0.1), 16, 2000)
    last = tr.rows[-1]
    assert last["outer_distance"] < 1e-9 and last["inner_distance"] < 1e-9 and last["value"] < 1e-10


def test_saba_zero_memory_also_converges(quad):
    tr = _final(quad, SABA(step_size=0.1, init_memory="zero"), 16, 2000)
    assert tr.rows[-1]["outer_distance"] < 1e-9


def test_soba_full_batch_constant_steps_reaches_solution(quad):
    tr = _final(quad, SOBA(step_size=0.1, inner_decay=0, outer_decay=0), "full", 2000)
    assert tr.rows[-1]["outer_distance"] < 1e-9


def test_soba_minibatch_decreasing_steps_makes_progress(quad):
    # the paper's decreasing steps (t^{-2/5}, t^{-3/5}): sublinear; documented tolerance: 100× decrease in 2000 steps
    tr = _final(quad, SOBA(), 16, 2000)
    assert tr.rows[-1]["value"] < 1e-2 * tr.rows[0]["value"]


def test_saba_variance_reduction_beats_soba_plateau(quad):
    """Same constant step and batches: SOBA stalls at its noise floor, SABA keeps decreasing."""
    soba = _final(quad, SOBA(step_size=0.1, inner_decay=0, outer_decay=0), 16, 2000, eval_every=250)
    saba = _final(quad, SABA(step_size=0.1), 16, 2000, eval_every=250)
    soba_v = [r["value"] for r in soba.rows]
    saba_v = [r["value"] for r in saba.rows]
    # SOBA: the second half of the run does not improve on its first-half best by more than 10×
    assert min(soba_v[5:]) > 0.1 * min(soba_v[1:5]), soba_v
    assert min(soba_v) > 1e-5, soba_v
    # SABA: keeps decreasing geometrically over the same steps
    assert saba_v[-1] < 1e-4 * saba_v[4], saba_v
    assert saba_v[-1] < 1e-6 * min(soba_v), (saba_v[-1], min(soba_v))


def test_amigo_full_batch_reaches_solution(quad):
    tr = _final(quad, AmIGO(step_size=0.1, outer_ratio=0.1), "full", 200)
    assert tr.rows[-1]["outer_distance"] < 1e-9


def test_amigo_minibatch_makes_progress(quad):
    # constant steps with noisy oracles: a noise ball; documented tolerance: 10× below the start
    tr = _final(quad, AmIGO(step_size=0.05, outer_ratio=0.05), 16, 100)
    assert tr.rows[-1]["value"] < 0.1 * tr.rows[0]["value"]


def test_stocbio_full_batch_neumann_bias(quad):
    # Q = 100 Neumann terms with η = 0.5: the truncation bias (1 − ημ)^{Q+1} is ~1e-2 relative at most
    tr = _final(quad, StocBiO(step_size=0.5, outer_ratio=0.5, neumann_steps=100), "full", 100)
    assert tr.rows[-1]["outer_distance"] < 1e-3 * tr.rows[0]["outer_distance"]
    assert tr.rows[-1]["value"] < 1e-5


def test_f2sa_bias_shrinks_like_one_over_lambda(quad):
    """F2SA's fixed point is O(1/λ) from x*: ×10 on a fixed λ gives ≈ ×100 on ‖∇h‖²."""
    common = dict(star_step_size=0.1, inner_decay=0, star_decay=0, outer_decay=0, lmbda_growth=0)
    v10 = _final(quad, F2SA(step_size=0.01, outer_ratio=0.01, lmbda0=10, **common), "full", 150).rows[-1]["value"]
    v100 = _final(quad, F2SA(step_size=0.001, outer_ratio=0.001, lmbda0=100, **common), "full", 150).rows[-1]["value"]
    assert v10 < 5e-3, v10
    assert v100 < 3e-2 * v10, (v10, v100)


def test_f2sa_default_schedule_makes_progress(quad):
    tr = _final(quad, F2SA(step_size=0.01, star_step_size=0.1, outer_ratio=0.01, lmbda0=10), "full", 100)
    assert tr.rows[-1]["value"] < 1e-2 * tr.rows[0]["value"]


def test_step_is_pure_and_reproducible(quad):
    bi, bo = quad.batches(16)
    solver = SABA()
    s0 = solver.init(quad.problem, quad.inner0, quad.outer0, bi, bo, seed=3)
    s1 = solver.step(s0, quad.problem, bi, bo)
    s1b = solver.step(s0, quad.problem, bi, bo)  # the old state is untouched: same result again
    assert torch.equal(s1.outer["x"], s1b.outer["x"]) and torch.equal(s1.inner["z"], s1b.inner["z"])
    before = s1.memory["grad"]["z"].clone()
    s2 = solver.step(s1, quad.problem, bi, bo)
    assert s0.t == 0 and s1.t == 1 and s2.t == 2
    assert torch.equal(s1.memory["grad"]["z"], before)  # the memories are copied, not updated in place
    assert not torch.equal(s2.memory["grad"]["z"], before)


def test_errors_name_the_option(quad):
    with pytest.raises(ValueError, match="step_size"):
        SOBA(step_size=0.0)
    with pytest.raises(ValueError, match="init_memory"):
        SABA(init_memory="ones")
    with pytest.raises(ValueError, match="inner_steps"):
        AmIGO(inner_steps=0)
    with pytest.raises(TypeError, match="inner_batches"):
        SOBA().init(quad.problem, quad.inner0, quad.outer0, [1, 2], Batches(lambda i: i, 1))
    with pytest.raises(TypeError, match="BilevelProblem"):
        SOBA().init(object(), quad.inner0, quad.outer0, *quad.batches(16))
    with pytest.raises(ValueError, match="batch_size"):
        quad.batches(0)


def test_sampler_visits_every_batch_once_per_epoch():
    from bilevel.stochastic import Sampler

    s = Sampler(7)
    state = s.init(5)
    seen = []
    for _ in range(14):
        i, state = s.next(state)
        seen.append(i)
    assert sorted(seen[:7]) == list(range(7)) and sorted(seen[7:]) == list(range(7))
    assert seen[:7] != seen[7:]  # reshuffled


def test_float32_and_float64_agree(quad):
    q32 = simulated_quadratic(n_inner=128, n_outer=128, dim_inner=10, dim_outer=5, seed=0, dtype=torch.float32)
    a = _final(quad, SABA(), 16, 300).rows[-1]["value"]
    b = _final(q32, SABA(), 16, 300).rows[-1]["value"]
    assert abs(a - b) <= 1e-3 * a + 1e-9, (a, b)
