"""Time of an ANIL meta-iteration against MAML's (same network, same episodes, second order).

ANIL (``learners.anil.ANIL``) adapts only the head: the body's features are computed once per
episode and the B heads are one batched problem, where MAML (``learners.maml.MAML``) runs the
whole network forward and backward at every inner step and back-propagates through all of
them. Conv-4 on 28×28 images, 15 queries, inner step 0.4 (5-way) / 0.1 (20-way), one thread,
interleaved median of ``--repeats`` meta-iterations (meta-loss + gradient) after a warm-up.

Before timing, ANIL's meta-gradient is checked in float64 (and float32) against an independent
per-episode unroll of the head written with ``torch.autograd.grad(create_graph=True)``.

    python benchmarks/anil_step.py
    python benchmarks/anil_step.py --filters 64 --repeats 9
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bilevel.data import Episodes, make_sampler  # noqa: E402
from learners.anil import ANIL  # noqa: E402
from learners.maml import MAML  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_run_options, image_dataset, interleaved_medians, rel_err  # noqa: E402

CONFIGS = [(5, 1, 8, 0.4), (5, 5, 8, 0.4), (20, 5, 4, 0.1)]  # (ways, inner steps, meta-batch, inner step size)


def reference_grads(m: ANIL, ep: Episodes, steps: int, lr: float) -> list[torch.Tensor]:
    """ANIL's meta-gradient by a per-episode unroll of the head (independent of bilevel.solve)."""
    losses = []
    for j in range(ep.batch_size):
        zs, zq = m.body(ep.support_x[j]), m.body(ep.query_x[j])
        w, b = m.head.weight, m.head.bias
        for _ in range(steps):
            gw, gb = torch.autograd.grad(F.cross_entropy(zs @ w.T + b, ep.support_y[j]), (w, b), create_graph=True)
            w, b = w - lr * gw, b - lr * gb
        losses.append(F.cross_entropy(zq @ w.T + b, ep.query_y[j]))
    return list(torch.autograd.grad(torch.stack(losses).mean(), list(m.parameters())))


def step_of(learner: Any) -> Any:
    def step(ep: Episodes) -> list[torch.Tensor]:
        loss, _ = learner.meta_loss(ep)
        return list(torch.autograd.grad(loss, list(learner.parameters())))
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--filters", type=int, default=32)
    add_run_options(ap, threads=1, repeats=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = image_dataset(args.data_root)
    print(f"# ANIL vs MAML (second order), Conv-4 ({args.filters} filters), {ds.name}, 1-shot, 15 queries, "
          f"torch {torch.__version__}, {args.threads} thread(s)")
    print("| ways | inner steps | meta-batch | ANIL s | MAML s | MAML / ANIL | ANIL vs unroll (f64 / f32) |")
    print("|---|---|---|---|---|---|---|")
    speedups = []
    for ways, steps, meta_batch, lr in CONFIGS:
        ep = make_sampler(ds, ways=ways, shots=1, queries=15, meta_batch=meta_batch, seed=0).sample(0)
        kw = {"example_shape": [1, 28, 28], "ways": ways, "filters": args.filters, "inner_steps": steps, "inner_lr": lr}
        errors = []
        for dtype in (torch.float64, torch.float32):
            torch.manual_seed(0)
            anil = ANIL(**kw).to(dtype)
            e = Episodes(*(t.to(dtype) if t.is_floating_point() else t for t in ep))
            errors.append(rel_err(step_of(anil)(e), reference_grads(anil, e, steps, lr)))
        assert errors[0] < 1e-8 and errors[1] < 1e-3, f"ANIL meta-gradient differs from the unroll: {errors}"
        torch.manual_seed(0)
        anil, maml = ANIL(**kw), MAML(**kw)
        steps_of = {"anil": step_of(anil), "maml": step_of(maml)}
        med = interleaved_medians({k: (lambda f=f, e=ep: f(e)) for k, f in steps_of.items()}, args.repeats)
        speedups.append(med["maml"] / med["anil"])
        print(f"| {ways} | {steps} | {meta_batch} | {med['anil']:.3f} | {med['maml']:.3f} | {speedups[-1]:.2f}x | "
              f"{errors[0]:.1e} / {errors[1]:.1e} |", flush=True)
    print(f"speedup of ANIL over MAML (5-way, 1 step): {speedups[0]:.2f}x")


if __name__ == "__main__":
    main()
