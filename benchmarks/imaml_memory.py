"""Peak memory and time of an iMAML meta-iteration against MAML's as the number of inner steps T grows.

iMAML (``learners.imaml.IMAML``, ``Implicit(CG(20))``, λ = 2) differentiates the solution of
its proximal inner problem, so nothing of the T inner steps is recorded; MAML
(``learners.maml.MAML``, ``Reverse()``) back-propagates through all of them. Both: Conv-4
(64 filters) on 28×28 images, 5-way 1-shot, 15 queries, meta-batch 4, inner step size 0.1,
one thread. Each (learner, T) runs in a fresh subprocess: one warm-up meta-iteration, the
median time of ``--repeats`` meta-iterations (meta-loss + gradient), then one under
``torch.profiler`` for memory. "peak MB" is the peak of the bytes held in tensors during the
meta-iteration above those held before (``_common.tensor_peak_mb``). (The resident set is not
reported: after the warm-up and timed passes the C allocator already holds the pages, so its
growth says nothing about the pass.)

Before measuring, the implicit meta-gradient is checked against its closed form
(I + H/λ)⁻¹ ∇E(φ*) on linear regression, in float64 and float32.

    python benchmarks/imaml_memory.py                  # T in {5, 10, 20, 50}
    python benchmarks/imaml_memory.py --steps 5 50     # a subset
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bilevel as bl  # noqa: E402
from bilevel.data import Episodes, make_sampler  # noqa: E402
from learners.imaml import IMAML  # noqa: E402
from learners.maml import MAML  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_run_options, image_dataset, tensor_peak_mb  # noqa: E402

LEARNERS = ("MAML Reverse()", "iMAML Implicit(CG(20))")


def make(name: str, steps: int) -> Any:
    torch.manual_seed(0)
    common = {"example_shape": [1, 28, 28], "ways": 5, "inner_steps": steps, "inner_lr": 0.1}
    if name.startswith("MAML"):
        return MAML(**common, hypergrad=bl.Reverse())
    return IMAML(**common, lam=2.0, hypergrad=bl.Implicit(bl.CG(maxiter=20)))


def run_one(name: str, steps: int, episode_file: str, threads: int, repeats: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    ep = Episodes(*torch.load(episode_file, weights_only=True))
    learner = make(name, steps)

    def step() -> list[torch.Tensor]:
        loss, _ = learner.meta_loss(ep)
        return list(torch.autograd.grad(loss, list(learner.parameters())))

    grads = step()  # warm-up: kernels, autograd threads
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = tensor_peak_mb(step)
    norm = float(sum((g.double() ** 2).sum() for g in grads) ** 0.5)
    return {"seconds": statistics.median(times), "peak_mb": peak, "grad_norm": norm}


def check_closed_form() -> dict[str, float]:
    """Relative error of iMAML's implicit meta-gradient against (I + H/λ)⁻¹∇E(φ*) (linear regression)."""
    out = {}
    for dtype in (torch.float64, torch.float32):
        g = torch.Generator().manual_seed(0)
        xs, xq = torch.randn(5, 3, generator=g, dtype=dtype), torch.randn(4, 3, generator=g, dtype=dtype)
        w = torch.randn(3, 1, generator=g, dtype=dtype)
        ep = Episodes(xs[None], (xs @ w)[None], xq[None], (xq @ w + 0.1)[None])
        torch.manual_seed(0)
        m = IMAML(example_shape=[3], ways=None, backbone="mlp", backbone_options={"hidden": []}, inner_steps=300,
                  inner_lr=0.1, lam=2.0).to(dtype)
        got = torch.autograd.grad(m.meta_loss(ep)[0], [m.net.net[0].weight, m.net.net[0].bias])
        got = torch.cat([x.reshape(-1) for x in got]).double()
        theta = torch.cat([m.net.net[0].weight.detach().reshape(-1), m.net.net[0].bias.detach()]).double()
        a_s = torch.cat([xs, torch.ones(5, 1, dtype=dtype)], 1).double()
        a_q = torch.cat([xq, torch.ones(4, 1, dtype=dtype)], 1).double()
        a = 2 / 5 * a_s.T @ a_s + 2.0 * torch.eye(4, dtype=torch.float64)
        phi = torch.linalg.solve(a, 2 / 5 * a_s.T @ (xs @ w).double()[:, 0] + 2.0 * theta)
        want = 2.0 * torch.linalg.solve(a, 2 / 4 * a_q.T @ (a_q @ phi - (xq @ w + 0.1).double()[:, 0]))
        out[str(dtype).replace("torch.", "")] = float((got - want).norm() / want.norm())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50])
    ap.add_argument("--meta-batch", type=int, default=4)
    add_run_options(ap, threads=1, repeats=3)
    ap.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.one[2], args.threads, args.repeats)))
        return
    errors = check_closed_form()
    assert errors["float64"] < 1e-8 and errors["float32"] < 1e-4, f"implicit meta-gradient is off: {errors}"
    ds = image_dataset(args.data_root)
    ep = make_sampler(ds, ways=5, shots=1, queries=15, meta_batch=args.meta_batch, seed=0).sample(0)
    print(f"# iMAML vs MAML, Conv-4 (64 filters), {ds.name} 5-way 1-shot, 15 queries, meta-batch {args.meta_batch}, "
          f"inner step 0.1, torch {torch.__version__}, {args.threads} thread(s)")
    print(f"# implicit meta-gradient vs closed form (linear regression): relative error {errors['float64']:.1e} "
          f"(float64), {errors['float32']:.1e} (float32)")
    print("| T | learner | peak MB | s / meta-iteration | grad norm |")
    print("|---|---|---|---|---|")
    results: dict[tuple[str, int], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        episode_file = str(Path(tmp) / "episodes.pt")
        torch.save(tuple(ep), episode_file)
        for steps in args.steps:
            for name in LEARNERS:
                out = subprocess.run([sys.executable, __file__, "--one", name, str(steps), episode_file,
                                      "--threads", str(args.threads), "--repeats", str(args.repeats)],
                                     capture_output=True, text=True, check=True)
                r = results[name, steps] = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"| {steps} | {name} | {r['peak_mb']:.1f} | {r['seconds']:.3f} | {r['grad_norm']:.4g} |", flush=True)
    lo, hi = min(args.steps), max(args.steps)
    for name in LEARNERS:
        ratio = results[name, hi]["peak_mb"] / results[name, lo]["peak_mb"]
        print(f"{name}: peak memory T={hi} / T={lo}: {ratio:.2f}x; time {results[name, hi]['seconds'] / results[name, lo]['seconds']:.2f}x")
    imaml = results[LEARNERS[1], hi]["peak_mb"] / results[LEARNERS[1], lo]["peak_mb"]
    print(f"iMAML memory at T={hi} vs MAML: {results[LEARNERS[1], hi]['peak_mb'] / results[LEARNERS[0], hi]['peak_mb']:.2f}x; "
          f"iMAML flat within 1.2x from T={lo} to T={hi}: {'met' if imaml <= 1.2 else 'MISSED'} ({imaml:.2f}x)")


if __name__ == "__main__":
    main()
