"""Benchmark of the MetaOptNet heads: forward + backward time and the KKT residual reached.

Episodes: B=8 per batch, d=1600 float32 embeddings (ReLU of a class mean plus noise, like
post-ReLU CNN features), 6 queries per class (MetaOptNet's meta-training setting, §4.1; ``--query``
changes it); the loss is the query cross-entropy, back-propagated to the support and query
embeddings (one meta-training step of the head). Times are process CPU time by default
(single thread), which other jobs on a shared machine disturb far less than wall time.

Peers, timed in the same run:
  * ``qpth reference``: MetaOptNet's own construction -- qpth ``QPFunction`` on
    ``Q = kron(Gram, I) + 1.0 I`` (float32), ``G = I``, ``h = C Y``, ``A = kron(I, 1^T)``,
    ``maxIter = 15``;
  * ``SVM-CS qpth``: the exact eq. (10) QP through ``solve_qp(backend="qpth")``.
Ours: ``svm_cs_head`` (structured exact solver), ``svm_cs_head(solver="qp")`` (generic native
layer), ``svm_cs_head(max_iter=15, early_stop="qpth")`` ("SVM-CS qpth-15": the qpth reference's
own iterate, computed natively; see ``benchmarks/metaoptnet_early_stop.py`` for its agreement),
``ridge_head``, ``r2d2_head`` and ``proto_head``.

Usage::

    PYTHONPATH=. python benchmarks/heads.py [--threads 1] [--repeats 20] [--quick]
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from heads_helpers import metaoptnet_qpth  # noqa: E402  (MetaOptNet's qpth call, shared with the tests)
from bilevel.qp import crammer_singer_qp, kkt_residual, solve_crammer_singer_dual, solve_qp  # noqa: E402
from learners.heads import proto_head, r2d2_head, ridge_head, svm_cs_head  # noqa: E402

CONFIGS = [(5, 1), (5, 5), (5, 15), (20, 5)]
B, D, C_SVM, LAM = 8, 1600, 0.1, 50.0
QUERY_PER_CLASS = 6  # MetaOptNet meta-trains with 6 queries per class (§4.1); --query changes it
GENERIC_MAX_VARS = 500  # the dense generic layer factorises (nK x nK) matrices: skip larger


def episode(way: int, shot: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    n, nq = way * shot, way * QUERY_PER_CLASS
    means = torch.randn(B, way, D, generator=g)
    ys = torch.arange(way).repeat(shot).expand(B, n).contiguous()
    yq = torch.arange(way).repeat(QUERY_PER_CLASS).expand(B, nq).contiguous()
    S = torch.relu(means.gather(1, ys[..., None].expand(B, n, D)) + torch.randn(B, n, D, generator=g))
    Q = torch.relu(means.gather(1, yq[..., None].expand(B, nq, D)) + torch.randn(B, nq, D, generator=g))
    return S.requires_grad_(), Q.requires_grad_(), ys, yq


def metaoptnet_qpth_logits(query: torch.Tensor, support: torch.Tensor, ys: torch.Tensor, way: int,
                           max_iter: int = 15) -> torch.Tensor:
    """MetaOptNet's SVM-CS head as in its code: qpth on kron(K, I) + 1.0 I, maxIter 15."""
    return (query @ support.mT) @ metaoptnet_qpth(support @ support.mT, ys, way, C_SVM, max_iter)


CLOCK: Callable[[], float] = time.process_time


def fwd_bwd(fn: Callable[[], torch.Tensor], yq: torch.Tensor | None, tensors: tuple[torch.Tensor, ...]) -> float:
    """Seconds of one forward + backward (query cross-entropy, or ``sum`` when ``yq`` is None)."""
    for t in tensors:
        t.grad = None
    t0 = CLOCK()
    out = fn()
    loss = out.sum() if yq is None else F.cross_entropy(out.reshape(-1, out.shape[-1]), yq.reshape(-1))
    loss.backward()
    return CLOCK() - t0


def solver_only(way: int, K: torch.Tensor, ys: torch.Tensor, R: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """The QP solve alone (Gram given): our structured solver vs MetaOptNet's qpth call."""
    Y = F.one_hot(ys, way).float()

    def native() -> torch.Tensor:
        return solve_crammer_singer_dual(K, Y, C_SVM * Y) * R

    def reference() -> torch.Tensor:
        return metaoptnet_qpth(K, ys, way, C_SVM, 15) * R

    return {"solver: native": native, "solver: qpth ref": reference}


def timed_interleaved(fns: dict[str, Callable[[], torch.Tensor]], yq: torch.Tensor | None,
                      tensors: tuple[torch.Tensor, ...], repeats: int,
                      budget_s: float) -> tuple[dict[str, float], dict[str, str]]:
    """Median seconds per method; methods are interleaved so that machine load hits all alike.

    Every method runs twice untimed (warm-up); a method whose warm-up exceeds ``budget_s /
    repeats`` gets fewer timed repeats (at least one). Failures are returned as messages.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    errors: dict[str, str] = {}
    cap: dict[str, int] = {}
    for name, fn in fns.items():
        try:
            warm = [fwd_bwd(fn, yq, tensors) for _ in range(2)]
            cap[name] = max(1, min(repeats, int(budget_s / max(min(warm), 1e-9))))
        except Exception as e:  # noqa: BLE001 - failures are results here
            errors[name] = str(e).splitlines()[0][:90]
    for r in range(repeats):
        for name, fn in fns.items():
            if name in cap and r < cap[name]:
                times[name].append(fwd_bwd(fn, yq, tensors))
    return {k: statistics.median(v) for k, v in times.items() if v}, errors


def residuals(S: torch.Tensor, ys: torch.Tensor, way: int) -> dict[str, float]:
    """KKT residual (infinity norm of eq. 7 + feasibility, original units) each solver reaches."""
    out: dict[str, float] = {}
    with torch.no_grad():
        K = (S @ S.mT).double()
        Y = F.one_hot(ys, way).double()
        b, n, m = Y.shape
        _, info = solve_crammer_singer_dual(K, Y, C_SVM * Y, return_info=True)
        out["SVM-CS native"] = float(info.residual.max())
        K1 = K + torch.eye(n, dtype=K.dtype)
        _, info = solve_crammer_singer_dual(K1, Y, C_SVM * Y, max_iter=15, early_stop="qpth", return_info=True)
        out["SVM-CS qpth-15"] = float(info.residual.max())  # on the reference's +I problem, like it
        Qm, p, G, h, A, bz = crammer_singer_qp(K, Y, C_SVM * Y)
        G, A, bz = G.expand(b, -1, -1), A.expand(b, -1, -1), bz.expand(b, -1)
        if n * m <= GENERIC_MAX_VARS:
            _, info = solve_qp(Qm, p, G, h, A, bz, return_info=True)
            out["SVM-CS generic QP"] = float(info.residual.max())
        for name, Qx, dt in (("SVM-CS qpth", Qm, torch.float32), ("qpth reference", Qm + torch.eye(n * m, dtype=K.dtype), torch.float32)):
            try:
                from bilevel.qp._qpth import qpth_duals

                args = [t.to(dt) for t in (Qx, p, G, h, A, bz)]
                it = 20 if name == "SVM-CS qpth" else 15
                z, lam, nu = qpth_duals(*args, max_iter=it, tol=1e-12)
                out[name] = float(kkt_residual(Qx, p, G, h, A, bz, z.double(), lam.double(), nu.double()).max())
            except Exception as e:  # noqa: BLE001 - reported in the table
                out[name] = float("nan")
                out[name + " error"] = str(e).splitlines()[0][:60]  # type: ignore[assignment]
        Kr = K + LAM * torch.eye(n, dtype=K.dtype)
        alpha = torch.linalg.solve(Kr, Y)
        out["ridge"] = out["R2D2"] = float((Kr @ alpha - Y).abs().max())
    return out


def steady_malloc() -> bool:
    """Raise glibc's mmap/trim thresholds so freed large tensors are reused, not re-faulted.

    Without it, every fresh multi-megabyte temporary is mmapped and page-faulted, and timings
    depend on heap history (the same ProtoNet step measured 0.47 or 0.85 ms/episode).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 1 << 30)) and bool(libc.mallopt(-1, 1 << 30))  # MMAP_, TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def main() -> None:
    global CLOCK, QUERY_PER_CLASS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--budget", type=float, default=60.0,
                    help="seconds of timed runs per method and episode size (caps slow peers' repeats)")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="process CPU time (default; robust to other jobs on a shared machine) or wall time")
    ap.add_argument("--quick", action="store_true", help="5w5s only, 5 repeats")
    ap.add_argument("--only", default="", help="comma-separated episode sizes, e.g. 5w1s,5w15s")
    ap.add_argument("--query", type=int, default=QUERY_PER_CLASS, help="queries per class (paper: 6 train, 15 test)")
    args = ap.parse_args()
    QUERY_PER_CLASS = args.query
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    malloc_note = "steady malloc" if steady_malloc() else "default malloc"
    print(f"torch {torch.__version__}, threads: {torch.get_num_threads()}, clock: {args.clock}, {malloc_note}, B={B}, d={D}, "
          f"{QUERY_PER_CLASS} queries/class, float32 embeddings, C={C_SVM}, lam={LAM}; median of "
          f"{5 if args.quick else args.repeats} interleaved runs, ms per episode = batch time / {B}")
    configs = [(5, 5)] if args.quick else CONFIGS
    if args.only:
        configs = [c for c in CONFIGS if f"{c[0]}w{c[1]}s" in args.only.split(",")]
    repeats = 5 if args.quick else args.repeats
    methods: dict[str, Callable[..., torch.Tensor]] = {
        "SVM-CS native": lambda q, s, y, w: svm_cs_head(q, s, y, w, C=C_SVM),
        "SVM-CS generic QP": lambda q, s, y, w: svm_cs_head(q, s, y, w, C=C_SVM, solver="qp"),
        "SVM-CS qpth": lambda q, s, y, w: svm_cs_head(q, s, y, w, C=C_SVM, solver="qpth"),
        "qpth reference": lambda q, s, y, w: metaoptnet_qpth_logits(q, s, y, w),
        "SVM-CS qpth-15": lambda q, s, y, w: svm_cs_head(q, s, y, w, C=C_SVM, max_iter=15, early_stop="qpth"),
        "ridge": lambda q, s, y, w: ridge_head(q, s, y, w, lam=LAM),
        "R2D2": lambda q, s, y, w: r2d2_head(q, s, y, w, lam=LAM),
        "ProtoNet": lambda q, s, y, w: proto_head(q, s, y, w),
    }
    header = f"{'episode':8s} {'head':18s} {'ms/episode':>11s} {'KKT residual':>13s}  note"
    print(header)
    print("-" * len(header))
    headline = None
    for way, shot in configs:
        S, Q, ys, yq = episode(way, shot, seed=way * 100 + shot)
        res = residuals(S, ys, way)
        fns = {name: (lambda fn=fn: fn(Q, S, ys, way)) for name, fn in methods.items()
               if not (name == "SVM-CS generic QP" and way * shot * way > GENERIC_MAX_VARS)}
        secs, errors = timed_interleaved(fns, yq, (S, Q), repeats, budget_s=args.budget)
        ms = {k: v / B * 1e3 for k, v in secs.items()}
        tag = f"{way}w{shot}s"
        for name in methods:
            if name not in fns:
                print(f"{tag:8s} {name:18s} {'-':>11s} {'-':>13s}  skipped: n*K={way * shot * way} > {GENERIC_MAX_VARS} (dense)")
            elif name in errors:
                print(f"{tag:8s} {name:18s} {'fails':>11s} {'-':>13s}  {errors[name]}")
            else:
                r = res.get(name)
                rs = f"{r:13.2e}" if r is not None else f"{'-':>13s}"
                note = "residual run failed" if name + " error" in res else ""
                print(f"{tag:8s} {name:18s} {ms[name]:11.3f} {rs}  {note}")
        K = (S @ S.mT).detach().requires_grad_()
        R = torch.randn(ys.shape + (way,), generator=torch.Generator().manual_seed(0))
        ssecs, serr = timed_interleaved(solver_only(way, K, ys, R), None, (K,), repeats, budget_s=args.budget)
        sms = {k: v / B * 1e3 for k, v in ssecs.items()}
        for name in ("solver: native", "solver: qpth ref"):
            val = f"{sms[name]:11.3f}" if name in sms else f"{'fails':>11s}"
            print(f"{tag:8s} {name:18s} {val} {'-':>13s}  Gram given (QP solve + implicit backward)")
        if len(sms) == 2:
            print(f"{'':8s} ratio solver: qpth ref / native: {sms['solver: qpth ref'] / sms['solver: native']:.2f}x")
        nat = ms.get("SVM-CS native")
        if nat:
            for peer in ("qpth reference", "SVM-CS qpth"):
                if peer in ms:
                    print(f"{'':8s} ratio {peer} / SVM-CS native: {ms[peer] / nat:.2f}x")
            if "qpth reference" in ms and "SVM-CS qpth-15" in ms:
                print(f"{'':8s} ratio qpth reference / SVM-CS qpth-15 (same iterate): "
                      f"{ms['qpth reference'] / ms['SVM-CS qpth-15']:.2f}x")
            if "ProtoNet" in ms:
                print(f"{'':8s} ratio SVM-CS native / ProtoNet: {nat / ms['ProtoNet']:.2f}x")
            peers = [ms[p] for p in ("qpth reference", "SVM-CS qpth") if p in ms]
            if (way, shot) == (5, 5) and peers:
                headline = min(peers) / nat
    if headline is not None:
        print(f"speedup vs fastest peer: {headline:.2f}x")


if __name__ == "__main__":
    main()
