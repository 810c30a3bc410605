"""MAML meta-iteration time and peak memory: bilevel against higher and torchopt, same run.

Headline configuration (issue "Performance"): Conv-4 with 64 filters on 28×28 Omniglot-sized
images, 5-way 1-shot, 15 queries per class, meta-batch 8, 1 inner step, second order. Also
20-way 1-shot with 5 inner steps, and first-order MAML. Every implementation adapts the same
network (the learner's Conv-4, whose parameters are the meta-parameters) on the same episodes;
the script asserts that their meta-gradients agree within 1e-4 (relative, over all parameters,
in float64), and that bilevel's float32 meta-gradient matches its float64 one
(``_common.check_float32``: median per-episode error ≤ 1e-4, or, where float64 itself is not
stable at float32 precision, within 10x of that instability), before it reports any time.

    python benchmarks/maml_vs_peers.py                       # all configurations
    python benchmarks/maml_vs_peers.py --configs 5w1s        # the headline only

Time: median over --repeats meta-iterations (forward + backward), implementations
interleaved. Peak memory: growth of the peak resident set during one meta-iteration (after a one-task
warm-up), each implementation in a fresh subprocess.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_run_options, bilevel_step, check_float32, interleaved_medians, peak_memory_mb, rel_err, with_threads  # noqa: E402

from bilevel.data import load_dataset, make_sampler  # noqa: E402
from learners.maml import MAML  # noqa: E402

CONFIGS = {
    "5w1s": dict(ways=5, shots=1, queries=15, meta_batch=8, steps=1, order="second"),
    "5w1s-first-order": dict(ways=5, shots=1, queries=15, meta_batch=8, steps=1, order="first"),
    "20w1s-5steps": dict(ways=20, shots=1, queries=15, meta_batch=8, steps=5, order="second"),
}
INNER_LR = 0.4


def episodes(cfg: dict, data_root: str | None, seed: int = 0):
    """One meta-batch of real Omniglot episodes (background set), or the offline glyphs."""
    if data_root is not None and Path(data_root, "omniglot").exists():
        ds = load_dataset("omniglot", data_root, "train")
    else:
        ds = load_dataset("glyphs", None, "train")
    s = make_sampler(ds, ways=cfg["ways"], shots=cfg["shots"], queries=cfg["queries"], meta_batch=cfg["meta_batch"], seed=seed)
    return s.sample(0), ds.name


def build(cfg: dict) -> MAML:
    torch.manual_seed(0)
    return MAML(example_shape=[1, 28, 28], ways=cfg["ways"], backbone="conv4", inner_steps=cfg["steps"], inner_lr=INNER_LR,
                hypergrad="reverse" if cfg["order"] == "second" else "first-order")


def step_higher(learner: MAML, ep, cfg: dict) -> list[torch.Tensor]:
    """higher's documented MAML loop (first order: the inner gradients are detached)."""
    import higher

    net = learner.net
    opt = torch.optim.SGD(net.parameters(), lr=INNER_LR)
    detach = (lambda grads: [g.detach() for g in grads]) if cfg["order"] == "first" else None
    total = 0.0
    for j in range(ep.support_x.shape[0]):
        with higher.innerloop_ctx(net, opt, copy_initial_weights=False) as (fnet, diffopt):
            for _ in range(cfg["steps"]):
                diffopt.step(F.cross_entropy(fnet(ep.support_x[j]), ep.support_y[j]), grad_callback=detach)
            total = total + F.cross_entropy(fnet(ep.query_x[j]), ep.query_y[j])
    return list(torch.autograd.grad(total / ep.support_x.shape[0], list(net.parameters())))


def step_torchopt(learner: MAML, ep, cfg: dict) -> list[torch.Tensor]:
    """torchopt's functional API (torchopt.sgd, inplace=False) on torch.func.functional_call."""
    import torchopt
    from torch.func import functional_call

    net = learner.net
    params0 = dict(net.named_parameters())
    opt = torchopt.sgd(lr=INNER_LR)
    total = 0.0
    for j in range(ep.support_x.shape[0]):
        params, state = params0, opt.init(params0)
        for _ in range(cfg["steps"]):
            loss = F.cross_entropy(functional_call(net, params, (ep.support_x[j],)), ep.support_y[j])
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=cfg["order"] == "second")
            updates, state = opt.update(dict(zip(params, grads)), state, inplace=False)
            params = torchopt.apply_updates(params, updates, inplace=False)
        total = total + F.cross_entropy(functional_call(net, params, (ep.query_x[j],)), ep.query_y[j])
    return list(torch.autograd.grad(total / ep.support_x.shape[0], list(params0.values())))


def implementations(cfg: dict, learner: MAML, threads: int = 1) -> dict:
    """name -> step(episodes) -> meta-gradient; the peers use ``threads`` intra-op threads,
    bilevel splits the tasks over ``threads`` CPU threads (one intra-op thread each)."""
    impls = {
        "bilevel": bilevel_step(learner, threads),
        "higher": with_threads(threads, lambda e: step_higher(learner, e, cfg)),
        "torchopt": with_threads(threads, lambda e: step_torchopt(learner, e, cfg)),
    }
    if threads > 1:
        impls["bilevel, tasks in sequence"] = with_threads(threads, bilevel_step(learner, 1))
    return impls


def one_memory(name: str, cfg_name: str, episode_file: str, threads: int) -> float:
    """Peak-RSS growth of one meta-iteration, in a process that holds nothing but the episodes."""
    torch.set_num_threads(threads)
    cfg = CONFIGS[cfg_name]
    ep = torch.load(episode_file, weights_only=False)
    learner = build(cfg)
    fn = implementations(cfg, learner, threads)[name]
    fn(type(ep)(*(t[:1] for t in ep)))  # warm-up on one task: loads kernels before the baseline
    return peak_memory_mb(lambda: fn(ep))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    add_run_options(ap)
    ap.add_argument("--memory-of", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--episode-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    root = args.data_root if Path(args.data_root).exists() else None
    if args.memory_of:
        print(json.dumps({"mb": one_memory(args.memory_of[0], args.memory_of[1], args.episode_file, args.threads)}))
        return
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {args.threads} threads (peers: intra-op threads; bilevel: tasks split over "
          f"{args.threads} CPU threads with 1 intra-op thread each and one backward pass per task), Conv-4 (64 filters) on 28x28")
    headline = None
    for cfg_name in args.configs:
        cfg = CONFIGS[cfg_name]
        ep, data_name = episodes(cfg, root)
        # Same computation? Checked in float64; then bilevel's float32 against its float64.
        ep64 = type(ep)(ep.support_x.double(), ep.support_y, ep.query_x.double(), ep.query_y)
        grads = {name: fn(ep64) for name, fn in implementations(cfg, build(cfg).double(), args.threads).items()}
        errs = {name: rel_err(grads["bilevel"], g) for name, g in grads.items() if name != "bilevel"}
        for name, err in errs.items():
            assert err < 1e-4, f"{cfg_name}: bilevel and {name} meta-gradients differ (relative error {err:.2e})"
        f32 = check_float32(lambda dtype, cfg=cfg: build(cfg).to(dtype), ep, args.threads, cfg_name)
        impls = implementations(cfg, build(cfg), args.threads)
        med = interleaved_medians({name: (lambda fn=fn: fn(ep)) for name, fn in impls.items()}, args.repeats)
        mem = {}
        with tempfile.TemporaryDirectory() as tmp:
            episode_file = str(Path(tmp) / "episodes.pt")
            torch.save(ep, episode_file)
            for name in impls:
                out = subprocess.run([sys.executable, __file__, "--memory-of", name, cfg_name, "--threads", str(args.threads),
                                      "--episode-file", episode_file], capture_output=True, text=True, check=True)
                mem[name] = json.loads(out.stdout.strip().splitlines()[-1])["mb"]
        fastest_peer = min(("higher", "torchopt"), key=lambda n: med[n])
        print(f"\n## {cfg_name}: {cfg['ways']}-way {cfg['shots']}-shot, {cfg['queries']} queries, meta-batch "
              f"{cfg['meta_batch']}, {cfg['steps']} inner step(s), {cfg['order']} order, data: {data_name}")
        print("meta-gradients agree (float64, relative error vs bilevel): "
              + ", ".join(f"{name} {err:.1e}" for name, err in errs.items()))
        print(f"bilevel {f32}")
        print("| implementation | s / meta-iteration | peak MB | speedup vs it |")
        print("|---|---|---|---|")
        for name in impls:
            print(f"| {name} | {med[name]:.3f} | {mem[name]:.0f} | {med[name] / med['bilevel']:.2f}x |")
        speedup = med[fastest_peer] / med["bilevel"]
        print(f"speedup vs fastest peer ({fastest_peer}): {speedup:.2f}x; peak memory ratio "
              f"{mem['bilevel'] / max(mem[fastest_peer], 1e-9):.2f}")
        if headline is None:
            headline = speedup
    print(f"\nspeedup vs fastest peer: {headline:.2f}x")


if __name__ == "__main__":
    main()
