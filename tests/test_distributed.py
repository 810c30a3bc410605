"""Data-parallel meta-training: 2 gloo ranks on CPU take the same step as one process.

The equivalence harness is parametrised by learner factory: for a fixed seed, 2 ranks x 4
episodes and 1 process x 8 episodes (the same episodes) must give the same meta-gradient and
parameter updates within 1e-6 relative, in float64, for MAML (second order), Meta-SGD,
Hyper-Representation and MetaOptNet-SVM.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from click.testing import CliRunner

from bilevel.cli import main
from bilevel.distributed import leave_group

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
META_BATCH = 8
WAYS, SHOTS, QUERIES = 3, 1, 2
BACKBONE = {"backbone": "conv4", "backbone_options": {"filters": 4}}

# name -> (registered learner, options besides the backbone)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "maml-second-order": ("maml", {"inner_steps": 2, "inner_lr": 0.3}),
    "meta-sgd": ("meta-sgd", {"inner_steps": 2, "inner_lr": 0.3}),
    "hyper-repr": ("hyper-repr", {}),
    "metaoptnet-svm": ("metaoptnet", {"head": "svm"}),
    # λ: H + λI positive definite; 3 inner steps do not solve the proximal problem (the certificate says so truthfully:
    # this test checks that 2 ranks give the step of 1 process, whatever the hypergradient)
    "imaml": ("imaml", {"inner_steps": 3, "inner_lr": 0.01, "lam": 50.0, "hypergrad": "implicit-cg:20:on-inexact=ignore"}),
    "anil": ("anil", {"inner_steps": 2, "inner_lr": 0.3}),
    "reptile": ("reptile", {"inner_steps": 2, "inner_lr": 0.1}),
}


def _sampler(split: str = "train", meta_batch: int = META_BATCH):
    from bilevel.data import load_splits, make_sampler

    ds = load_splits("glyphs", None, (split,), classes={"train": 12, "val": 6, "test": 6}, examples_per_class=4,
                     size=16)
    return make_sampler(ds[split], ways=WAYS, shots=SHOTS, queries=QUERIES, meta_batch=meta_batch, seed=5)


def _double(ep):
    from bilevel.data import Episodes

    return Episodes(*(t.double() if t.is_floating_point() else t for t in ep))


class _Float64Sampler:
    """The episodes of ``sampler`` in float64 (what :func:`evaluate_learner` needs of a sampler)."""

    def __init__(self, sampler) -> None:
        self.sampler, self.meta_batch = sampler, sampler.meta_batch

    def sample(self, iteration: int, indices=None):
        return _double(self.sampler.sample(iteration, indices=indices))


def _run_case(name: str, rank: int, world: int) -> dict[str, Any]:
    """Two outer SGD-momentum steps of learner ``name`` in float64 on this rank's share."""
    from bilevel.registry import get_learner
    from bilevel.train import _share, evaluate_learner, meta_gradient

    learner_name, kwargs = CASES[name]
    torch.manual_seed(0)
    learner = get_learner(learner_name).factory(example_shape=[1, 16, 16], ways=WAYS, **BACKBONE, **kwargs).double()
    params = [p for p in learner.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    sampler = _sampler()
    share = _share(META_BATCH, rank, world)
    start = {k: v.detach().clone() for k, v in learner.named_parameters()}
    out: dict[str, Any] = {"share": share}
    for it in range(2):
        stats = meta_gradient(learner, _double(sampler.sample(it, indices=share)), params)
        if it == 0:
            out["stats"] = stats.clone()
            out["grad"] = torch.cat([p.grad.reshape(-1) for p in params]).clone()
        opt.step()
    out["update"] = torch.cat([(v.detach() - start[k]).reshape(-1) for k, v in learner.named_parameters()])
    val = _Float64Sampler(_sampler("val", meta_batch=4))
    learner.eval()
    out["eval"] = evaluate_learner(learner, val, 5)  # 5 episodes: split unevenly across ranks
    return out


def _masked_average(rank: int) -> list[torch.Tensor | None]:
    """a: gradient on both ranks; b: on rank 0 only; c: on none."""
    from bilevel.distributed import average_gradients

    a, b, c = (torch.zeros(3, requires_grad=True) for _ in range(3))
    a.grad = torch.full((3,), float(rank + 1))
    b.grad = torch.full((3,), 4.0) if rank == 0 else None
    stats = average_gradients([a, b, c], torch.tensor([float(rank), 10.0 * rank], dtype=torch.float64))
    return [a.grad, b.grad, c.grad, stats]


def _sin_fit(out: str, iterations: int, resume: bool | str = False) -> dict[str, Any]:
    from bilevel.train import DataConfig, TrainConfig, fit

    cfg = TrainConfig(iterations=iterations, val_every=2, val_episodes=5, test_episodes=6, checkpoint_every=2, out=out,
                      progress=False, tensorboard=False, seed=3)
    return fit("maml", {"inner_lr": 0.01, "inner_steps": 1},
               DataConfig(dataset="sinusoid", shots=5, queries=5, meta_batch=4), cfg, resume=resume)


def _fit_in_group(rank: int, out: str) -> dict[str, Any]:
    """``fit`` inside an existing process group: errors are raised on every rank, resume works."""
    res: dict[str, Any] = {"first": _sin_fit(out, 2)}
    try:
        _sin_fit(out, 4)
    except ValueError as e:
        res["exists"] = str(e)
    res["resumed"] = _sin_fit(out, 4, resume=True)
    res["state"] = torch.load(Path(out) / "checkpoint.pt", weights_only=True)["learner"] if rank == 0 else None
    return res


def _worker(rank: int, world: int, store: str, out: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=90))
    finished = False
    try:
        results = {name: _run_case(name, rank, world) for name in names}
        results["_masked"] = _masked_average(rank)
        results["_fit"] = _fit_in_group(rank, f"{out}.fit")
        torch.save(results, f"{out}.{rank}")
        finished = True
    finally:
        leave_group(synchronize=finished)  # a rank leaving while its peer still works can abort (gloo)
    # torch 2.14 keeps a gloo process group (and its threads) alive after destroy_process_group once
    # torch._dynamo has been imported (torch.optim's step imports it); those threads are then torn
    # down during interpreter finalisation, which sometimes aborts the process (SIGABRT, "terminate
    # called without an active exception") after all the work is done. The results are on disk:
    # leave without finalisation.
    os._exit(0)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[int, dict[str, Any]]:
    """Run every importable case once on 2 gloo ranks (one spawn for all: process start is slow)."""
    tmp = tmp_path_factory.mktemp("dist")
    names = list(CASES)
    ctx = mp.start_processes(_worker, args=(WORLD, str(tmp / "store"), str(tmp / "result"), names), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.time() + 240
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2-rank workers did not finish in 240 s (deadlock?)")
    return {r: torch.load(tmp / f"result.{r}", weights_only=False) for r in range(WORLD)}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_take_the_step_of_one_process(name, two_ranks, f64):
    ref = _run_case(name, rank=0, world=1)
    assert ref["share"] == list(range(META_BATCH))
    assert two_ranks[0][name]["share"] == [0, 1, 2, 3] and two_ranks[1][name]["share"] == [4, 5, 6, 7]
    assert ref["grad"].dtype == f64 and float(ref["grad"].norm()) > 0
    for r in range(WORLD):
        got = two_ranks[r][name]
        assert _relative(got["grad"], ref["grad"]) < 1e-6, (r, _relative(got["grad"], ref["grad"]))
        assert _relative(got["update"], ref["update"]) < 1e-6
        torch.testing.assert_close(got["stats"], ref["stats"], rtol=1e-9, atol=0)
        assert got["eval"]["episodes"] == 5
        assert got["eval"]["mean"] == pytest.approx(ref["eval"]["mean"], rel=1e-9, abs=1e-12)
        assert got["eval"]["ci95"] == pytest.approx(ref["eval"]["ci95"], rel=1e-9, abs=1e-12)
    # the harness can fail: half of the meta-batch alone gives another gradient
    from bilevel.registry import get_learner
    from bilevel.train import meta_gradient

    learner_name, kwargs = CASES[name]
    torch.manual_seed(0)
    learner = get_learner(learner_name).factory(example_shape=[1, 16, 16], ways=WAYS, **BACKBONE, **kwargs).double()
    params = [p for p in learner.parameters() if p.requires_grad]
    meta_gradient(learner, _double(_sampler().sample(0, indices=[0, 1, 2, 3])), params)
    assert _relative(torch.cat([p.grad.reshape(-1) for p in params]), ref["grad"]) > 1e-3


def test_average_gradients_keeps_none_where_every_rank_has_none(two_ranks):
    for r in range(WORLD):
        a, b, c, stats = two_ranks[r]["_masked"]
        torch.testing.assert_close(a, torch.full((3,), 1.5))
        torch.testing.assert_close(b, torch.full((3,), 2.0))  # (4 + 0) / 2: a missing gradient counts as 0
        assert c is None  # like one process: the optimizer skips it
        torch.testing.assert_close(stats, torch.tensor([0.5, 5.0], dtype=torch.float64))


def test_fit_in_a_process_group_refuses_reuse_on_every_rank_and_resumes(two_ranks, tmp_path):
    for r in range(WORLD):
        res = two_ranks[r]["_fit"]
        assert "pass --resume" in res["exists"]  # raised on rank 1 too: no rank is left waiting
        assert res["first"]["world_size"] == WORLD and res["resumed"]["iterations"] == 4
        assert res["resumed"]["test"] == two_ranks[0]["_fit"]["resumed"]["test"]
    # the same run in one process (2 + 2 iterations) ends with the same parameters
    _sin_fit(str(tmp_path / "one"), 2)
    one = _sin_fit(str(tmp_path / "one"), 4, resume=True)
    ref = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)["learner"]
    for k, v in ref.items():
        torch.testing.assert_close(two_ranks[0]["_fit"]["state"][k], v, rtol=1e-5, atol=1e-6)
    assert one["test"]["mean"] == pytest.approx(two_ranks[0]["_fit"]["resumed"]["test"]["mean"], rel=1e-4)


# --------------------------------------------------------------------------- the CLI: --nproc, torchrun, faults
TINY = ["maml", "train", "--dataset", "sinusoid", "--shots", "5", "--queries", "5", "--meta-batch", "4",
        "--val-episodes", "4", "--test-episodes", "8", "--threads", "1", "--no-progress", "--no-tensorboard",
        "--inner-lr", "0.01", "--checkpoint-every", "4", "--val-every", "100",
        # SGD with a small step, not Adam with a large one: Adam turns near-zero gradients into
        # full-size steps of random sign and large steps make training chaotic; either would
        # amplify the float32 summation-order differences between 1 and 2 processes.
        "--optimizer", "sgd", "--outer-lr", "0.01"]
ITERATIONS = 200
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _iteration(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["iteration"])
    except Exception:  # noqa: BLE001 - not written yet
        return 0


def _ranks_of(pid: int) -> list[int]:
    """The worker processes of the launcher process ``pid`` (``--nproc``: spawn; torchrun: ``-m bilevel.cli``)."""
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    cmdlines = {int(k): Path(f"/proc/{k}/cmdline").read_bytes() for k in kids}
    return [k for k, c in cmdlines.items() if b"spawn_main" in c or b"bilevel.cli" in c]


def _kill_a_rank_midway(cmd: list[str], out: Path) -> tuple[subprocess.CompletedProcess, int]:
    """Start ``cmd`` (2 ranks), SIGKILL rank 1's process after the checkpoint of iteration 8."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while _iteration(out / "checkpoint.pt") < 8 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    killed_at = _iteration(out / "checkpoint.pt")
    if proc.poll() is None:
        ranks = _ranks_of(proc.pid)
        assert len(ranks) == 2, ranks
        os.kill(max(ranks), signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert 8 <= killed_at < ITERATIONS, f"the run was not interrupted mid-way (checkpoint at {killed_at})"
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), killed_at


def _params(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoint.pt", weights_only=True)["learner"]


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the rank processes through /proc (Linux)")
def test_nproc2_matches_one_process_and_a_killed_rank_leaves_a_resumable_checkpoint(tmp_path):
    args = [*TINY, "--iterations", str(ITERATIONS)]
    one = tmp_path / "one"
    r = CliRunner().invoke(main, [*args, "--out", str(one)])
    assert r.exit_code == 0, r.output

    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "bilevel.cli", *args, "--nproc", "2", "--out", str(two)]
    died, killed_at = _kill_a_rank_midway(cmd, two)
    assert died.returncode == 1, died.stderr[-3000:]
    assert "was killed by SIGKILL" in died.stderr and "is intact: run the same command with --resume" in died.stderr
    assert not (two / "metrics.json").exists()
    ckpt = torch.load(two / "checkpoint.pt", weights_only=True)  # intact (atomic writes by rank 0)
    assert ckpt["identity"]["world_size"] == 2 and killed_at <= ckpt["iteration"] < ITERATIONS
    assert len(ckpt["rng"]) == 2  # one RNG state per rank

    # resuming needs the same number of processes
    r = CliRunner().invoke(main, [*args, "--out", str(two), "--resume"])
    assert r.exit_code == 2 and "written by 2 process(es) but this run has 1" in r.output, r.output
    done = subprocess.run([*cmd, "--resume"], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("test mse:") == 1, done.stdout  # rank 0 speaks for all

    # 2 processes x 2 episodes, interrupted and resumed == 1 process x 4 episodes, up to summation order
    a, b = _params(one), _params(two)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    rows = lambda out: [r.split(",")[:4] for r in (out / "log.csv").read_text().splitlines()[1:]]  # noqa: E731
    assert [r[:2] for r in rows(one)] == [r[:2] for r in rows(two)]
    for r1, r2 in zip(rows(one), rows(two)):  # same logged losses and validation errors
        assert [float(v) for v in r2[2:]] == pytest.approx([float(v) for v in r1[2:]], rel=1e-4, nan_ok=True)


def test_nproc_usage_errors_come_before_any_process_starts(tmp_path):
    def run(*extra: str):
        return CliRunner().invoke(main, [*TINY, "--iterations", "2", "--out", str(tmp_path / "o"), *extra])

    r = run("--nproc", "3")
    assert r.exit_code == 2 and "--meta-batch 4 is not divisible by --nproc 3" in r.output, r.output
    if torch.cuda.device_count() < 2:
        r = run("--nproc", "2", "--device", "cuda")
        assert r.exit_code == 2 and "--nproc 2 with --device cuda needs 2 GPUs" in r.output, r.output
    r = run("--nproc", "2", "--device", "cuda:1")
    assert r.exit_code == 2 and "pass --device cuda (rank r uses cuda:r)" in r.output, r.output
    assert CliRunner().invoke(main, [*TINY, "--iterations", "2", "--out", str(tmp_path / "one")]).exit_code == 0
    r = CliRunner().invoke(main, [*TINY, "--iterations", "4", "--out", str(tmp_path / "one"), "--resume",
                                  "--nproc", "2"])
    assert r.exit_code == 2 and "written by 1 process(es) but this run has 2" in r.output, r.output
    assert "Traceback" not in r.output


@pytest.mark.slow
def test_torchrun_runs_killed_resumed_or_restarted_equal_the_uninterrupted_run(tmp_path):
    """Bitwise the same parameters: torchrun uninterrupted; torchrun --max-restarts 1 with a rank
    killed (the restarted workers continue from the checkpoint); --nproc 2 killed, then --resume."""
    args = [*TINY, "--iterations", str(ITERATIONS)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    ref = tmp_path / "torchrun"
    subprocess.run([*torchrun, "-m", "bilevel.cli", *args, "--out", str(ref)], env=ENV, check=True,
                   capture_output=True, timeout=300)
    restarted = tmp_path / "restarted"
    done, _ = _kill_a_rank_midway([*torchrun, "--max-restarts", "1", "-m", "bilevel.cli", *args,
                                   "--out", str(restarted)], restarted)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "nproc"
    cmd = [sys.executable, "-m", "bilevel.cli", *args, "--nproc", "2", "--out", str(run)]
    died, _ = _kill_a_rank_midway(cmd, run)
    assert died.returncode == 1
    subprocess.run([*cmd, "--resume"], env=ENV, check=True, capture_output=True, timeout=300)
    a = _params(ref)
    for other in (restarted, run):
        b = _params(other)
        for k in a:
            assert torch.equal(a[k], b[k]), (other.name, k)


def test_resume_auto_starts_or_continues(tmp_path):
    """What workers restarted by torchrun --max-restarts do: resume if there is a checkpoint."""
    first = _sin_fit(str(tmp_path), 2, resume="auto")  # nothing there: a new run
    assert first["iterations"] == 2
    _sin_fit(str(tmp_path), 4, resume="auto")  # continues from iteration 2
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["iteration"] == 4
    with pytest.raises(ValueError, match="resume must be True, False or 'auto'"):
        _sin_fit(str(tmp_path), 4, resume="yes")
