"""MetaOptNet training step: SVM-CS head against the ProtoNet head, Conv-4 on Omniglot.

One outer step (embedding of support and query sets, head, query cross-entropy, backward
through the head and the backbone) of ``learners.metaoptnet.MetaOptNet`` with Conv-4 (64
filters) on 28×28 Omniglot episodes, meta-batch 8. The paper reports a 30–50% overhead of the
SVM head over ProtoNet on GPU; the target here is at most 1.3×. Both heads' meta-gradients are
checked against finite differences in the test suite (``tests/test_learners_metaoptnet.py``);
this script checks that the SVM step's gradient is finite before timing.

    python benchmarks/metaoptnet_step.py
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_run_options, image_dataset, interleaved_medians  # noqa: E402

from bilevel.data import make_sampler  # noqa: E402
from learners.metaoptnet import MetaOptNet  # noqa: E402


def step(learner: MetaOptNet, ep) -> list[torch.Tensor]:
    loss, _ = learner.meta_loss(ep)
    return list(torch.autograd.grad(loss, list(learner.parameters())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10], help="training shots K (5-way; Omniglot has 20 drawings per character)")
    ap.add_argument("--queries", type=int, default=6, help="queries per class (MetaOptNet trains with 6)")
    ap.add_argument("--meta-batch", type=int, default=8)
    add_run_options(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = image_dataset(args.data_root)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads; MetaOptNet Conv-4 (64 filters), {ds.name} "
          f"5-way, {args.queries} queries/class, meta-batch {args.meta_batch}")
    print("| shots | ProtoNet s/step | SVM-CS s/step | SVM / ProtoNet |")
    print("|---|---|---|---|")
    ratios = []
    for shots in args.shots:
        ep = make_sampler(ds, ways=5, shots=shots, queries=args.queries, meta_batch=args.meta_batch, seed=0).sample(0)
        learners = {}
        for head in ("proto", "svm"):
            torch.manual_seed(0)
            learners[head] = MetaOptNet(example_shape=list(ep.support_x.shape[2:]), ways=5, head=head)
        grads = step(learners["svm"], ep)
        assert all(torch.isfinite(g).all() for g in grads), "non-finite SVM meta-gradient"
        med = interleaved_medians({h: (lambda h=h: step(learners[h], ep)) for h in learners}, args.repeats)
        ratios.append(med["svm"] / med["proto"])
        print(f"| {shots} | {med['proto']:.3f} | {med['svm']:.3f} | {ratios[-1]:.2f}x |", flush=True)
    print(f"SVM / ProtoNet step-time ratio at {args.shots[0]}-shot: {ratios[0]:.2f}x (target <= 1.3x)")


if __name__ == "__main__":
    main()
