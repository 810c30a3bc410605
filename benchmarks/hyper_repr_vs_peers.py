"""Hyper-Representation meta-iteration: bilevel's batched ground models against a per-task higher loop.

bilevel (``learners.hyper_repr.HyperRepr``) computes the representation once per meta-batch
and trains the B logistic-regression heads as one batched problem (inner steps are batched
matrix products), back-propagating through the T steps (Reverse). The peer is the same
algorithm written the usual way with higher: for each episode, the representation of its
support and query sets, a zero-initialised ``nn.Linear`` head trained for T differentiable SGD
steps with the learned step size η (``override={"lr": [η]}``), the query loss. The script
asserts that both give the same meta-gradient (relative error < 1e-4 over all parameters, in
float64), and that bilevel's float32 meta-gradient matches its float64 one
(``_common.check_float32``: median per-episode error ≤ 1e-4), before reporting time.

    python benchmarks/hyper_repr_vs_peers.py            # T in {5, 50}
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_run_options, image_dataset, time_against_higher  # noqa: E402

from bilevel.data import make_sampler  # noqa: E402
from learners.hyper_repr import HyperRepr  # noqa: E402


def step_higher(learner: HyperRepr, ep) -> list[torch.Tensor]:
    import higher

    b, ways = ep.support_x.shape[0], int(ep.support_y.max()) + 1
    eta = learner.log_eta.exp()
    total = 0.0
    for j in range(b):
        zs, zq = learner.h(ep.support_x[j]), learner.h(ep.query_x[j])
        head = torch.nn.Linear(zs.shape[1], ways).to(zs.dtype)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        opt = torch.optim.SGD(head.parameters(), lr=1.0)
        with higher.innerloop_ctx(head, opt, override={"lr": [eta]}) as (fhead, diffopt):
            for _ in range(learner.inner_steps):
                diffopt.step(F.cross_entropy(fhead(zs), ep.support_y[j]))
            total = total + F.cross_entropy(fhead(zq), ep.query_y[j])
    return list(torch.autograd.grad(total / b, list(learner.parameters())))



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[5, 50], help="inner steps T")
    ap.add_argument("--ways", type=int, default=5)
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--queries", type=int, default=15)
    ap.add_argument("--meta-batch", type=int, default=8)
    add_run_options(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = image_dataset(args.data_root)
    ep = make_sampler(ds, ways=args.ways, shots=args.shots, queries=args.queries, meta_batch=args.meta_batch, seed=0).sample(0)
    print(f"# torch {torch.__version__}, {args.threads} threads (higher: intra-op; bilevel: episodes split over "
          f"{args.threads} CPU threads); Conv-4 (32 filters) representation, "
          f"{ds.name} {args.ways}-way {args.shots}-shot, {args.queries} queries, meta-batch {args.meta_batch}")
    print("| T | bilevel s/it | higher s/it | speedup | grad rel. error (float64) | bilevel float32 vs float64 |")
    print("|---|---|---|---|---|---|")
    speedups = []
    for steps in args.steps:
        def make(dtype: torch.dtype) -> HyperRepr:
            torch.manual_seed(0)
            return HyperRepr(example_shape=list(ep.support_x.shape[2:]), ways=args.ways, inner_steps=steps,
                             inner_lr=0.1).to(dtype)

        tb, th, err, f32 = time_against_higher(make, step_higher, ep, args.threads, args.repeats, f"T={steps}")
        speedups.append(th / tb)
        print(f"| {steps} | {tb:.3f} | {th:.3f} | {th / tb:.2f}x | {err:.1e} | {f32} |")
    print(f"speedup vs fastest peer: {speedups[0]:.2f}x")


if __name__ == "__main__":
    main()
