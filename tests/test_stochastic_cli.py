"""`bilevel bench` (bilevel.stochastic.cli.bench), invoked directly with click's CliRunner."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from bilevel.stochastic.cli import bench


def test_bench_writes_trace_summary_and_plot(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(bench, ["--problem", "quadratic", "--solver", "saba", "--max-time", "0.3",
                                   "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    (name, s), = summary["solvers"].items()
    assert name.startswith("SABA(") and s["stopped"] == "time"
    assert 0.0 < s["final"] <= 108.1  # ‖∇h(x₀)‖² = 108.09 on the default draw; convergence is tested elsewhere
    assert set(s) >= {"time_to_0.0001", "time_to_1e-06", "steps"}
    assert (out / "bench.png").stat().st_size > 1000
    rows = (out / "trace.csv").read_text().splitlines()
    assert rows[0].startswith("solver,") and len(rows) >= 2
    assert "|grad h|^2" in r.output


@pytest.mark.parametrize("args, hint", [
    (["--problem", "data_cleaning"], "--data-root"),
    (["--batch-size", "0"], "--batch-size"),
    (["--step-size", "-1"], "--step-size"),
])
def test_bench_usage_errors(tmp_path, args, hint):
    r = CliRunner().invoke(bench, [*args, "--max-time", "0.1", "--out", str(tmp_path), "--no-progress"])
    assert r.exit_code == 2, r.output
    assert hint in r.output


def test_benchopt_adapter_agrees_with_autograd(f64):
    """JaxOracles (benchmark_bilevel's oracle convention) vs AutogradOracles on the same quadratic."""
    jax = pytest.importorskip("jax", reason="jax is in the optional 'bench' extra")
    import jax.numpy as jnp
    import torch

    from bilevel.stochastic import AutogradOracles, simulated_quadratic
    from bilevel.stochastic.benchopt import JaxOracles, benchmark_batches

    jax.config.update("jax_enable_x64", True)
    b = simulated_quadratic(n_inner=64, n_outer=64, dim_inner=6, dim_outer=3, seed=0, dtype=f64)
    arr = {lvl: {k: jnp.asarray(v.numpy()) for k, v in b.info[f"data_{lvl}"].items()} for lvl in ("inner", "outer")}

    def make(d):
        def f(z, x, start=0, batch_size=1):
            s = {k: jax.lax.dynamic_slice_in_dim(v, start, batch_size) for k, v in d.items()}
            per = 0.5 * (s["u"] @ z) ** 2 + 0.5 * (s["p"] @ x) ** 2 + (s["c"] @ x) * (s["e"] @ z) + s["a"] @ z + s["b"] @ x
            return per.mean()
        return f

    jo = JaxOracles(make(arr["inner"]), make(arr["outer"]), 16, 16)
    ao = AutogradOracles(b.problem)
    g = torch.Generator().manual_seed(0)
    z, x, v = (torch.randn(n, generator=g, dtype=f64) for n in (6, 3, 6))
    batches = benchmark_batches(64, 16)
    assert batches.n == 4 and batches.get(2) == 32
    gj, hj, cj = jo.hvp_cross({"inner": z}, {"outer": x}, {"inner": v}, 32)
    ga, ha, ca = ao.hvp_cross({"z": z}, {"x": x}, {"z": v}, slice(32, 48))
    torch.testing.assert_close(gj["inner"], ga["z"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hj["inner"], ha["z"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cj["outer"], ca["x"], rtol=1e-12, atol=1e-12)
    fzj, fxj = jo.outer_grads({"inner": z}, {"outer": x}, 16)
    fza, fxa = ao.outer_grads({"z": z}, {"x": x}, slice(16, 32))
    torch.testing.assert_close(fzj["inner"], fza["z"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fxj["outer"], fxa["x"], rtol=1e-12, atol=1e-12)
