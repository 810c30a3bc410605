"""Peak memory and time of a MAML meta-iteration against the number of inner steps T.

Reverse (back-propagation through all T steps) against Checkpointed (segments of about
sqrt(T) steps recomputed in the backward pass) against FirstOrder (no second derivatives), for
``learners.maml.MAML`` with Conv-4 (64 filters) on 28×28 images, 5-way 1-shot, 15 queries,
meta-batch 4. Each configuration runs in a fresh subprocess; "peak MB" is the growth of the
process's peak resident set during the meta-iteration.

    python benchmarks/maml_memory.py                 # T in {1, 5, 20}
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bilevel.data import load_dataset, make_sampler  # noqa: E402
from learners.maml import MAML  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_run_options, peak_memory_mb  # noqa: E402


def strategies(steps: int) -> dict[str, str]:
    every = max(1, round(math.sqrt(steps)))
    return {"Reverse()": "reverse", f"Checkpointed({every})": f"checkpointed:{every}", "FirstOrder()": "first-order"}


def run_one(hypergrad: str, steps: int, episode_file: str, threads: int) -> dict:
    torch.set_num_threads(threads)
    ep = torch.load(episode_file, weights_only=False)
    torch.manual_seed(0)
    learner = MAML(example_shape=[1, 28, 28], ways=5, inner_steps=steps, inner_lr=0.4, hypergrad=hypergrad)
    small = type(ep)(*(t[:1] for t in ep))
    loss, _ = learner.meta_loss(small)  # warm-up: kernels and autograd threads before the baseline
    torch.autograd.grad(loss, list(learner.parameters()))
    out: dict[str, Any] = {}

    def step() -> None:
        t0 = time.perf_counter()
        loss, _ = learner.meta_loss(ep)
        grads = torch.autograd.grad(loss, list(learner.parameters()))
        out["seconds"] = time.perf_counter() - t0
        out["grad_norm"] = float(sum((g.double() ** 2).sum() for g in grads) ** 0.5)

    out["peak_mb"] = peak_memory_mb(step)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 5, 20])
    ap.add_argument("--meta-batch", type=int, default=4)
    add_run_options(ap, threads=1, repeats=None)
    ap.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.one[2], args.threads)))
        return
    root = Path(args.data_root)
    ds = load_dataset("omniglot", root, "train") if (root / "omniglot").exists() else load_dataset("glyphs", None, "train")
    ep = make_sampler(ds, ways=5, shots=1, queries=15, meta_batch=args.meta_batch, seed=0).sample(0)
    print(f"# MAML Conv-4 (64 filters), {ds.name} 5-way 1-shot, 15 queries, meta-batch {args.meta_batch}, "
          f"torch {torch.__version__}, {args.threads} thread(s)")
    print("| T | strategy | peak MB | s / meta-iteration | grad norm |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        episode_file = str(Path(tmp) / "episodes.pt")
        torch.save(ep, episode_file)
        for steps in args.steps:
            for name, spec in strategies(steps).items():
                out = subprocess.run([sys.executable, __file__, "--one", spec, str(steps), episode_file,
                                      "--threads", str(args.threads)], capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"| {steps} | `{name}` | {r['peak_mb']:.0f} | {r['seconds']:.2f} | {r['grad_norm']:.4g} |", flush=True)


if __name__ == "__main__":
    main()
