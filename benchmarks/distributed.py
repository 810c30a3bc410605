"""Data-parallel meta-training throughput: episodes/s with 1 and 2 processes, scaling efficiency.

Times the outer step of the training loop (:func:`bilevel.train.meta_gradient` on this rank's
share of the meta-batch, the all-reduce, ``opt.step()``) on real Omniglot (reduced background
sets in ``--data-root``), Conv-4, for these configurations, each in the same run:

* ``1 proc x 1 thread``  -- the baseline (the peer);
* ``2 procs x 1 thread`` -- data-parallel, gloo on CPU (``bilevel <method> train --nproc 2``);
* ``1 proc x 2 threads`` -- the other way to use two cores (intra-op threads), for reference.

Scaling efficiency = (episodes/s with P processes) / (P x episodes/s with 1 process), both
with 1 thread per process. Also reported: CPU seconds per episode summed over the processes
(``time.process_time``; time blocked in a collective is not CPU time), whose ratio is the
data-parallel overhead independent of what else runs on the machine. Workers are started by the same launcher as ``--nproc``
(:func:`bilevel.distributed.launch`); start-up and data loading are not timed. Each timed
window starts and ends with a barrier; rank 0's wall time is reported.

    python benchmarks/distributed.py --data-root ../shared/data [--method metaoptnet|maml]
"""
from __future__ import annotations

import argparse
import platform
import time
from typing import Any

import torch

# Conv-4 on Omniglot; MetaOptNet: SVM head, SGD + Nesterov (its paper's optimiser).
LEARNERS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "metaoptnet": ({"backbone": "conv4", "head": "svm"},
                   {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}),
    "maml": ({"backbone": "conv4", "inner_steps": 1, "inner_lr": 0.4, "hypergrad": "reverse"},
             {"optimizer": "adam", "lr": 1e-3}),
}


def _worker(method: str, opts: dict[str, Any], threads: int) -> dict[str, Any]:
    """One rank: build data, learner and optimiser, time ``opts['iterations']`` outer steps."""
    import torch.distributed as dist

    from bilevel.data import load_splits, make_sampler
    from bilevel.data.transforms import example_shape
    from bilevel.distributed import init_from_env, leave_group, world
    from bilevel.parallel import meta_gradient
    from bilevel.registry import get_learner
    from bilevel.train import _share

    torch.set_num_threads(threads)
    _, owned = init_from_env("cpu")
    finished = False
    try:
        rank, size = world()
        ds = load_splits("omniglot", opts["data_root"], ("train",))["train"]
        sampler = make_sampler(ds, ways=opts["ways"], shots=opts["shots"], queries=opts["queries"],
                               meta_batch=opts["meta_batch"], seed=0)
        kwargs, optim = LEARNERS[method]
        torch.manual_seed(0)
        learner = get_learner(method).factory(example_shape=list(example_shape(ds.transform)), ways=opts["ways"], **kwargs)
        params = [p for p in learner.parameters() if p.requires_grad]
        if optim["optimizer"] == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=optim["lr"], momentum=optim["momentum"],
                                                         nesterov=optim["nesterov"], weight_decay=optim["weight_decay"])
        else:
            opt = torch.optim.Adam(params, lr=optim["lr"])
        share = _share(opts["meta_batch"], rank, size)
        learner.train()

        def step(it: int) -> None:
            meta_gradient(learner, sampler.sample(it, indices=share), params)
            opt.step()

        for it in range(opts["warmup"]):
            step(it)
        if size > 1:
            dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        for it in range(opts["warmup"], opts["warmup"] + opts["iterations"]):
            step(it)
        cpu = torch.tensor([time.process_time() - c0], dtype=torch.float64)
        if size > 1:
            dist.barrier()
            dist.all_reduce(cpu)  # CPU seconds of all ranks (time blocked in collectives is not CPU time)
        seconds = time.perf_counter() - t0
        result = {"seconds": seconds, "cpu": float(cpu), "episodes": opts["iterations"] * opts["meta_batch"],
                  "threads": torch.get_num_threads(), "processes": size}
        finished = True
        return result
    finally:
        if owned:
            leave_group(synchronize=finished)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="metaoptnet", choices=sorted(LEARNERS))
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--ways", type=int, default=5)
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--queries", type=int, default=15)
    ap.add_argument("--meta-batch", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=10, help="timed outer steps per configuration")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="run every configuration this many times, keep the best")
    args = ap.parse_args()
    method = args.method
    keys = ("data_root", "ways", "shots", "queries", "meta_batch", "iterations", "warmup")
    opts = {k: getattr(args, k) for k in keys}
    from bilevel.distributed import launch

    configs = [(1, 1), (2, 1), (1, 2)]  # (processes, threads per process)
    results: dict[tuple[int, int], float] = {}
    cpu: dict[tuple[int, int], float] = {}  # CPU seconds per episode, all processes together
    for _ in range(args.repeats):
        for nproc, threads in configs:
            r = launch(_worker, (method, opts, threads), nproc=nproc, threads=threads)
            assert r["threads"] == threads and r["processes"] == nproc
            if r["episodes"] / r["seconds"] > results.get((nproc, threads), 0.0):
                results[(nproc, threads)] = r["episodes"] / r["seconds"]
                cpu[(nproc, threads)] = r["cpu"] / r["episodes"]
    base = results[(1, 1)]
    print(f"{method} Conv-4, Omniglot {args.ways}-way {args.shots}-shot {args.queries} queries, meta-batch "
          f"{args.meta_batch}, {args.iterations} timed steps (+{args.warmup} warm-up), best of {args.repeats}; "
          f"torch {torch.__version__}, {platform.machine()}, gloo on CPU")
    print(f"{'configuration':<24}{'episodes/s':>12}{'vs 1x1':>9}{'efficiency':>12}{'CPU s/episode':>15}")
    for nproc, threads in configs:
        eps = results[(nproc, threads)]
        eff = f"{eps / (nproc * base):.0%}" if threads == 1 else "-"
        label = f"{nproc} proc{'s' if nproc > 1 else ''} x {threads} thread{'s' if threads > 1 else ''}"
        print(f"{label:<24}{eps:>12.2f}{eps / base:>8.2f}x{eff:>12}{cpu[(nproc, threads)]:>15.3f}")
    print(f"CPU-time efficiency of 2 processes (1x1 CPU s/episode / 2x1 CPU s/episode): "
          f"{cpu[(1, 1)] / cpu[(2, 1)]:.0%}; wall-clock numbers depend on what else runs on the cores")


if __name__ == "__main__":
    main()
