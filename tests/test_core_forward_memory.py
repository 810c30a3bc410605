"""Forward()'s memory guard: estimate the tangents before the first step, refuse above a cap (issue 13, part 6)."""
from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bilevel as bl
import bilevel.hypergrad as hg_mod
from bilevel import _memory

REPO = Path(__file__).resolve().parents[1]


class PerExampleWeights:
    """Weighted least squares with one hyperparameter per example: m = n tangent directions."""

    def __init__(self, n: int, d: int, dtype: torch.dtype, width: int = 1) -> None:
        g = torch.Generator().manual_seed(0)
        self.X = torch.randn(n, d, generator=g, dtype=dtype)
        self.y = torch.randn(n, width, generator=g, dtype=dtype)
        self.n, self.d, self.width, self.dtype = n, d, width, dtype
        self.calls = 0

    def inner(self, p, h, b):
        self.calls += 1
        X, y = b
        pred = (X @ p["w"])[:, None] * torch.ones(1, self.width, dtype=self.dtype)  # [n, width] activations
        return (h["a"][:, None] * (pred - y) ** 2).mean() + 0.1 * (p["w"] ** 2).sum()

    @staticmethod
    def outer(p, h, b):
        return (p["w"] ** 2).sum()

    def solve(self, strategy, steps=3):
        hp = {"a": torch.ones(self.n, dtype=self.dtype, requires_grad=True)}
        w = bl.solve(bl.BilevelProblem(self.inner, self.outer), {"w": torch.zeros(self.d, dtype=self.dtype)}, hp,
                     (self.X, self.y), dynamics=bl.GradientDescent(0.1), steps=steps, hypergrad=strategy)
        return torch.autograd.grad(self.outer(w, hp, None), hp["a"])[0]


def test_large_m_is_refused_before_the_first_step(f64):
    pr = PerExampleWeights(n=1500, d=100, dtype=f64)  # tangents m × |w| = 1500 × 100 × 8 B = 1.14 MiB
    with pytest.raises(bl.ForwardMemoryError) as e:
        pr.solve(bl.Forward(max_memory=2_000_000))
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    assert pr.calls <= 2  # the captured-tensor probe and the activation probe: no inner step ran
    assert "above the cap of 1.91 MiB (max_memory=2000000)" in msg
    assert "m = 1,500 differentiated entries (hparams['a']: 1,500)" in msg
    assert "carried tangents 1.14 MiB, held twice during a step" in msg
    est = float(re.search(r"need an estimated ([0-9.]+) MiB", msg).group(1))
    assert est > 2 * 1.14 + 1500 * 1508 * 8 / 2**20  # two copies of the carried tangents, the one-hot seeds
    assert "Use Reverse() or Checkpointed(k)" in msg and "A chunk_size does not help" in msg
    assert "Forward(max_memory=None) skips this check" in msg
    # no cap: it runs (and is right)
    g_fwd = pr.solve(bl.Forward(max_memory=None), steps=2)
    g_rev = pr.solve(bl.Reverse(), steps=2)
    assert torch.allclose(g_fwd, g_rev, rtol=1e-10, atol=1e-14)


def test_chunk_size_is_suggested_when_it_fits(f64):
    """Large activations, few tangents: the vmap working set dominates and a chunk size bounds it."""
    pr = PerExampleWeights(n=100, d=4, dtype=f64, width=500)  # activations 100 × 500 × 8 B = 391 KiB per direction
    with pytest.raises(bl.ForwardMemoryError, match=r"Forward\(chunk_size=(\d+)\) lowers the estimate") as e:
        pr.solve(bl.Forward(max_memory=8 * 1024**2))
    chunk = int(re.search(r"chunk_size=(\d+)", str(e.value)).group(1))
    assert 1 <= chunk < 100
    g_fwd = pr.solve(bl.Forward(chunk_size=chunk, max_memory=8 * 1024**2), steps=2)  # now accepted
    assert torch.allclose(g_fwd, pr.solve(bl.Reverse(), steps=2), rtol=1e-10, atol=1e-14)


def test_estimate_components(f64):
    pr = PerExampleWeights(n=300, d=20, dtype=f64, width=5)
    hp = {"a": torch.ones(300, dtype=f64, requires_grad=True)}
    from bilevel._engine import Run

    p0 = {"w": torch.zeros(20, dtype=f64)}
    dyn = bl.HeavyBall(lr=0.1, momentum=0.9)
    run = Run(bl.BilevelProblem(pr.inner, pr.outer), dyn, hp, (pr.X, pr.y), 3, True, p0, p0, dyn.init(p0, hp))
    est = bl.Forward(chunk_size=50)._memory_estimate(run, ["a"], [])
    assert est.m == 300 and est.chunk == 50
    assert est.state_bytes == 2 * 20 * 8  # HeavyBall carries params and velocity
    assert est.tangents == 300 * 2 * 20 * 8
    assert est.seeds == 300 * (300 + 20) * 8  # one-hot tangents of hparams and of params0
    assert est.per_direction >= 2 * 300 * 5 * 8  # at least the [n, width] activations, twice
    assert est.total() == est.seeds + 2 * est.tangents + 50 * est.state_bytes + 50 * est.per_direction


def test_auto_cap_uses_available_memory(f64, monkeypatch):
    pr = PerExampleWeights(n=1000, d=50, dtype=f64)
    monkeypatch.setattr(hg_mod, "available_memory", lambda device: (1_000_000, "test source"))
    with pytest.raises(bl.ForwardMemoryError, match=r"above the cap of 488 KiB \(max_memory='auto': 0.5 × 977 KiB available \(test source\)\)"):
        pr.solve(bl.Forward())
    monkeypatch.setattr(hg_mod, "available_memory", lambda device: (None, "unknown"))
    pr.solve(bl.Forward(), steps=1)  # unknown: no cap


def test_available_memory_on_this_machine(monkeypatch):
    avail, source = _memory.available_memory(torch.device("cpu"))
    assert avail is not None and avail > 0
    if os.path.exists("/proc/meminfo"):
        assert source in ("MemAvailable in /proc/meminfo", "RLIMIT_AS (ulimit -v)") or source.startswith("cgroup")
    # without /proc/meminfo it falls back to os.sysconf
    monkeypatch.setattr(_memory, "_meminfo_available", lambda: None)
    monkeypatch.setattr(_memory, "_limits", lambda: [])
    avail2, source2 = _memory.available_memory(torch.device("cpu"))
    assert source2 == "free physical pages (os.sysconf)" and avail2 > 0


def test_max_memory_is_validated():
    for bad in (0, -5, True, "lots", 1.5):
        with pytest.raises(ValueError, match=r"Forward\(max_memory=...\) must be 'auto', None or a number of bytes >= 1"):
            bl.Forward(max_memory=bad)


def test_expanded_params0_are_named(f64):
    """MAML with batched tasks: params0 expanded over B tasks counts B × |θ| directions."""
    b, d = 8, 30
    theta = torch.randn(d, dtype=f64, requires_grad=True)
    x = torch.randn(b, 5, d, dtype=f64)
    prob = bl.BilevelProblem(lambda p, h, bt: ((torch.einsum("bnd,bd->bn", bt, p["w"])) ** 2).sum(),
                             lambda p, h, bt: p["w"].sum())
    with pytest.raises(bl.ForwardMemoryError, match=r"m = 240 differentiated entries \(params0\['w'\]: 240\).*"
                                                    r"params0 \['w'\] are expanded views \(stride 0\).*run Forward per task"):
        bl.solve(prob, {"w": theta.expand(b, d)}, {}, x, dynamics=bl.GradientDescent(0.1), steps=1,
                 hypergrad=bl.Forward(max_memory=10_000))


def test_sinusoid_cli_fails_in_seconds_with_the_message(tmp_path):
    """Issue 13: `bilevel maml train --dataset sinusoid --meta-batch 25 --hypergrad forward` grew to 21 GB.

    That command stacked the 25 tasks into one problem (m = 25 × 1761 tangents). MAML now runs
    forward mode task by task (m = 1761, a few MB), so the command trains; `--batch-tasks always`
    forces the stacked path it used to take, which must now stop in seconds with the estimate.
    Run under an address-space limit (so that the old behaviour fails with an allocation error
    instead of taking the machine down); the cap follows from that limit.
    """
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, 8 * 2**30))

    cmd = [sys.executable, "-c", "import sys; sys.argv[0] = 'bilevel'; from bilevel.cli import main; main()", "maml", "train",
           "--dataset", "sinusoid", "--meta-batch", "25", "--hypergrad", "forward", "--iterations", "30",
           "--batch-tasks", "always", "--out", str(tmp_path / "run")]
    start = time.monotonic()
    r = subprocess.run(cmd, preexec_fn=limit, capture_output=True, text=True, timeout=300, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Error: Forward(): the forward-mode tangents need an estimated" in r.stderr
    assert "m = 44,025 differentiated entries" in r.stderr and "Use Reverse() or Checkpointed(k)" in r.stderr
    assert "Traceback" not in r.stderr
    assert time.monotonic() - start < 120  # seconds, not an OOM kill (most of it is importing torch)
