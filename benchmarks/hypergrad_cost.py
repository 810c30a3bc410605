"""Wall time and peak memory of each hypergradient strategy against the number of inner steps T.

Problem: multinomial logistic regression, 784 features x 10 classes (7,850 weights), with one
L2 weight per feature as hyperparameters (m = 784, parametrised as exp(λ_j)); inner dynamics is
gradient descent on n training examples; the outer loss is the validation cross-entropy.
Synthetic Gaussian data (the cost does not depend on the values).

Each (strategy, T) runs in a fresh subprocess: one timed solve + backward, then the same again
under ``torch.profiler`` for memory. "peak MB" is the peak of the bytes held in tensors during
solve + backward above those held before (the CPU allocator's allocations and frees replayed in
time order); "RSS MB" is the growth of the process's peak resident set in the timed pass
(kernel high-water mark reset through /proc/self/clear_refs), which the C allocator's caching
and page granularity blur below about a megabyte.

    python benchmarks/hypergrad_cost.py                 # T in {10, 100, 1000}
    python benchmarks/hypergrad_cost.py --steps 10 100  # a subset
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import bilevel as bl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import peak_memory_mb, tensor_peak_mb  # noqa: E402

STRATEGIES = {
    "Reverse()": lambda: bl.Reverse(),
    "Checkpointed(30)": lambda: bl.Checkpointed(30),
    "Truncated(10)": lambda: bl.Truncated(10),
    "Forward()": lambda: bl.Forward(),
    "Implicit(CG(20))": lambda: bl.Implicit(bl.CG(maxiter=20)),
}


def run_one(name: str, steps: int, n: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    d, k = 784, 10
    x_tr, y_tr = torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g)
    x_va, y_va = torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g)

    def inner(p, h, b):
        x, y = b
        return F.cross_entropy(x @ p["W"] + p["b"], y) + 0.5 * (torch.exp(h["log_l2"])[:, None] * p["W"] ** 2).sum()

    def outer(p, h, b):
        x, y = b
        return F.cross_entropy(x @ p["W"] + p["b"], y)

    problem = bl.BilevelProblem(inner, outer)
    params0 = {"W": torch.zeros(d, k), "b": torch.zeros(k)}
    log_l2 = torch.full((d,), -4.0, requires_grad=True)
    dyn = bl.GradientDescent(lr=0.1)
    # warm-up with 10 steps: loads kernels and starts autograd threads before the baseline
    w = bl.solve(problem, params0, {"log_l2": log_l2}, (x_tr, y_tr), dynamics=dyn, steps=10, hypergrad=STRATEGIES[name]())
    torch.autograd.grad(problem.outer_loss(w, {}, (x_va, y_va)), log_l2)
    del w
    out: dict = {}

    def step() -> None:
        t0 = time.perf_counter()
        w = bl.solve(problem, params0, {"log_l2": log_l2}, (x_tr, y_tr), dynamics=dyn, steps=steps, hypergrad=STRATEGIES[name]())
        (hg,) = torch.autograd.grad(problem.outer_loss(w, {}, (x_va, y_va)), log_l2)
        out["seconds"] = time.perf_counter() - t0
        out["hg_norm"] = float(hg.norm())

    rss = peak_memory_mb(step)
    seconds = out["seconds"]
    peak = tensor_peak_mb(step)
    return {"strategy": name, "T": steps, "seconds": seconds, "peak_mb": peak, "rss_mb": rss, "hg_norm": out["hg_norm"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--n", type=int, default=100, help="training (and validation) examples")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps timings stable on a shared CPU)")
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    ap.add_argument("--one", nargs=2, metavar=("STRATEGY", "T"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.n, args.threads)))
        return

    print(f"# logistic regression 784x10, m=784 per-feature L2 hyperparameters, n={args.n}, "
          f"torch {torch.__version__}, {args.threads} threads")
    results: dict[tuple[str, int], dict] = {}
    for name in args.strategies:
        for steps in args.steps:
            out = subprocess.run([sys.executable, __file__, "--one", name, str(steps), "--n", str(args.n),
                                  "--threads", str(args.threads)], capture_output=True, text=True, check=True)
            results[(name, steps)] = json.loads(out.stdout.strip().splitlines()[-1])
            r = results[(name, steps)]
            print(f"  {name:<18} T={steps:<5} {r['seconds']:8.2f} s {r['peak_mb']:8.2f} MB (RSS {r['rss_mb']:.1f} MB)",
                  file=sys.stderr, flush=True)
    t_lo, t_hi = min(args.steps), max(args.steps)
    print("| strategy | " + " | ".join(f"T={t} time (s)" for t in args.steps) + " | "
          + " | ".join(f"T={t} peak MB" for t in args.steps) + f" | memory T={t_hi} / T={t_lo} | "
          + " | ".join(f"T={t} RSS MB" for t in args.steps) + " |")
    print("|---|" + "---|" * (3 * len(args.steps) + 1))
    for name in args.strategies:
        times = " | ".join(f"{results[(name, t)]['seconds']:.2f}" for t in args.steps)
        mems = " | ".join(f"{results[(name, t)]['peak_mb']:.2f}" for t in args.steps)
        rss = " | ".join(f"{results[(name, t)]['rss_mb']:.1f}" for t in args.steps)
        ratio = results[(name, t_hi)]["peak_mb"] / max(results[(name, t_lo)]["peak_mb"], 1e-9)
        print(f"| `{name}` | {times} | {mems} | {ratio:.2f}x | {rss} |")


if __name__ == "__main__":
    main()
