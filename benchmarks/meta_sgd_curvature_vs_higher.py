"""Meta-SGD and Meta-Curvature meta-iterations: bilevel against the same algorithms written with higher.

higher's versions: Meta-SGD as differentiable SGD with one parameter group per weight whose
learning rate is overridden by the learned elementwise step sizes α (``override={"lr": α}``);
Meta-Curvature as differentiable SGD whose gradients are transformed by the learned curvature
matrices (``grad_callback``). Both loop over the tasks of the meta-batch, as higher requires.
bilevel runs ``learners.meta_sgd.MetaSGD`` / ``learners.meta_curvature.MetaCurvature``, which
batch the tasks of a meta-batch into one inner problem when that is faster (MLPs; conv nets on
accelerators) and loop otherwise (conv nets on CPU). The meta-gradients are checked to agree
(relative error < 1e-4 over all parameters, in float64), and bilevel's float32 meta-gradient
against its float64 one (``_common.check_float32``: median per-episode error ≤ 1e-4), before
timing in float32.

    python benchmarks/meta_sgd_curvature_vs_higher.py
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

from bilevel.data import load_dataset, make_sampler  # noqa: E402
from learners.common import param_key  # noqa: E402
from learners.meta_curvature import MetaCurvature, curvature_transform  # noqa: E402
from learners.meta_sgd import MetaSGD  # noqa: E402


def task_loss(learner, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean() if learner.task == "regression" else F.cross_entropy(out, y)


def step_higher(learner, ep) -> list[torch.Tensor]:
    import higher

    net = learner.net
    names = [k for k, _ in net.named_parameters()]
    opt = torch.optim.SGD([{"params": [p]} for p in net.parameters()], lr=learner.config.inner_lr)
    if isinstance(learner, MetaSGD):
        kwargs = {"override": {"lr": [learner.alpha[param_key(k)] for k in names]}}
    else:
        mats = [dict(learner.curvature[param_key(k)].items()) for k in names]
        kwargs = {"grad_callback": lambda grads: [curvature_transform(g, m) for g, m in zip(grads, mats)]}
    override = kwargs.pop("override", None)
    total = 0.0
    for j in range(ep.support_x.shape[0]):
        with higher.innerloop_ctx(net, opt, copy_initial_weights=False, override=override) as (fnet, diffopt):
            for _ in range(learner.inner_steps):
                diffopt.step(task_loss(learner, fnet(ep.support_x[j]), ep.support_y[j]), **kwargs)
            total = total + task_loss(learner, fnet(ep.query_x[j]), ep.query_y[j])
    return list(torch.autograd.grad(total / ep.support_x.shape[0], list(learner.parameters()), allow_unused=True))



def problems(data_root: Path) -> dict:
    sin = load_dataset("sinusoid", None, "train")
    img = image_dataset(data_root)
    return {
        "sinusoid MLP 40-40, 5-shot, meta-batch 25, 1 step": (
            make_sampler(sin, ways=None, shots=5, queries=10, meta_batch=25, seed=0).sample(0),
            {"example_shape": [1], "ways": None, "inner_lr": 0.01, "inner_steps": 1}),
        f"{img.name} Conv-4 (64), 5-way 1-shot, 15 queries, meta-batch 8, 1 step": (
            make_sampler(img, ways=5, shots=1, queries=15, meta_batch=8, seed=0).sample(0),
            {"example_shape": [1, 28, 28], "ways": 5, "inner_lr": 0.4, "inner_steps": 1}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {args.threads} threads (higher: intra-op; bilevel: tasks split over "
          f"{args.threads} CPU threads when they loop over tasks)")
    print("| learner | problem | bilevel s/it | higher s/it | speedup | grad rel. error (float64) | bilevel float32 vs float64 |")
    print("|---|---|---|---|---|---|---|")
    headline = None
    for problem, (ep, kwargs) in problems(Path(args.data_root)).items():
        for cls in (MetaSGD, MetaCurvature):
            def make(dtype: torch.dtype, cls=cls, kwargs=kwargs):
                torch.manual_seed(0)
                return cls(**kwargs).to(dtype)

            tb, th, err, f32 = time_against_higher(make, step_higher, ep, args.threads, args.repeats, f"{cls.__name__} / {problem}")
            print(f"| {cls.__name__} | {problem} | {tb:.4f} | {th:.4f} | {th / tb:.2f}x | {err:.1e} | {f32} |", flush=True)
            if cls is MetaSGD and "Conv-4" in problem:  # headline: the MAML benchmark's configuration
                headline = th / tb
    print(f"speedup vs fastest peer: {headline:.2f}x")


if __name__ == "__main__":
    main()
