"""The benchmark scripts keep running against the library they measure.

Benchmarks are scripts, not tests, and the full runs take minutes; but a script that no longer runs
hides its claim. ``meta_sgd_curvature_vs_higher.py`` broke unnoticed when the learners' options
moved into ``learner.config`` (found re-measuring the tables on 2026-12-02). Here its cheapest
problem (sinusoid MLP) goes through the script's own path: float64 agreement with higher (< 1e-4),
the float32 check, one timed repetition.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str) -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize("learner", ["MetaSGD", "MetaCurvature"])
def test_meta_sgd_curvature_benchmark_runs_its_sinusoid_problem(tmp_path: Path, learner: str) -> None:
    pytest.importorskip("higher")
    bench = _script("meta_sgd_curvature_vs_higher")
    problems = bench.problems(tmp_path)  # no omniglot/ there: the image problem uses the offline glyphs
    name = next(k for k in problems if k.startswith("sinusoid"))
    ep, kwargs = problems[name]
    cls = getattr(bench, learner)

    def make(dtype: torch.dtype) -> torch.nn.Module:
        torch.manual_seed(0)
        return cls(**kwargs).to(dtype)

    ours, peer, err, f32 = bench.time_against_higher(make, bench.step_higher, ep, 1, 1, f"{learner} / {name}")
    assert err < 1e-10  # float64: the same computation up to summation order (measured 1.7e-16 to 2.0e-16)
    assert ours > 0 and peer > 0 and f32.startswith("float32 vs float64")
