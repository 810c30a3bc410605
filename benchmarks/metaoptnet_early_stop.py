"""MetaOptNet's early stopping: how far each k-iteration head is from qpth's, and from the exact one.

MetaOptNet (Lee et al. 2019, §4.1) stops qpth's interior-point method after ``maxIter``
iterations (15 at meta-training, 3 at meta-test) on ``Q = kron(K, I) + 1.0 I``, C = 0.1. For
episodes of synthetic post-ReLU features (``relu(class mean + noise)``, B = 8 episodes solved as
one batch, 15 queries per class) this script measures, for k = 1, 3, 15:

* z (the dual variables ``alpha``), relative to ``max |z*|``, z* the exact solution of that QP:
  ``qpth-k vs z*`` (how early the stop is), ``native-k`` (``solve_crammer_singer_dual(max_iter=k)``,
  the native interior-point method capped at k, on the same QP), ``ours-k``
  (``early_stop="qpth"``) against qpth's k-th iterate in float64, and against qpth in float32
  (the dtype MetaOptNet ran in);
* logits, relative to ``max |logits|`` of the exact default head (``svm_cs_head``, eq. 10,
  no ridge): MetaOptNet's k-iteration logits (qpth float64) vs the exact head, the native cap
  ``svm_cs_head(max_iter=k)`` vs MetaOptNet's, ``svm_cs_head(max_iter=k, early_stop="qpth")`` vs
  MetaOptNet's in float64 and in float32, and the fraction of queries whose predicted class
  differs from MetaOptNet's float32 head;
* time of one forward + backward of the head (query cross-entropy), ours in float32 vs
  MetaOptNet's qpth construction in float32, after checking that they agree.

Usage::

    python benchmarks/metaoptnet_early_stop.py [--threads 1] [--repeats 10] [--quick]
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import interleaved_medians  # noqa: E402
from heads_helpers import metaoptnet_qpth  # noqa: E402  (MetaOptNet's qpth call, shared with the tests)
from bilevel.qp import solve_crammer_singer_dual  # noqa: E402
from learners.heads import METAOPTNET_DUAL_RIDGE, svm_cs_head  # noqa: E402

B, C_SVM, QUERIES, SEED = 8, 0.1, 15, 0
CONFIGS = [(5, 1, 64), (5, 5, 64), (5, 1, 1600), (5, 5, 1600), (5, 15, 1600)]
ITERS = (1, 3, 15)


def episode(way: int, shot: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """``support [B, n, d], query [B, nq, d], support labels, query labels`` (fixed seed)."""
    g = torch.Generator().manual_seed(SEED + 1000 * way + 100 * shot + d)
    n, nq = way * shot, way * QUERIES
    means = torch.randn(B, way, d, generator=g, dtype=torch.float64)
    ys = torch.arange(way).repeat(shot).expand(B, n).contiguous()
    yq = torch.arange(way).repeat(QUERIES).expand(B, nq).contiguous()
    f64 = torch.float64
    S = torch.relu(means.gather(1, ys[..., None].expand(B, n, d)) + torch.randn(B, n, d, generator=g, dtype=f64))
    Q = torch.relu(means.gather(1, yq[..., None].expand(B, nq, d)) + torch.randn(B, nq, d, generator=g, dtype=f64))
    return S.to(dtype), Q.to(dtype), ys, yq


def metaoptnet_alpha(support: torch.Tensor, ys: torch.Tensor, way: int, k: int) -> torch.Tensor:
    """MetaOptNet's code path: qpth ``QPFunction(maxIter=k)`` on ``kron(K, I) + 1.0 I`` (input dtype)."""
    return metaoptnet_qpth(support @ support.mT, ys, way, C_SVM, k)


def metaoptnet_logits(query: torch.Tensor, support: torch.Tensor, ys: torch.Tensor, way: int, k: int) -> torch.Tensor:
    return (query @ support.mT) @ metaoptnet_alpha(support, ys, way, k)


def rel(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / scale.abs().max())


Z_COLS = ["qpth-k vs z*", "native-k vs qpth-k", "ours-k vs qpth-k", "qpth-k f32 vs f64"]
L_COLS = ["qpth-k vs exact", "native-k vs qpth-k", "ours-k vs qpth-k", "qpth-k f32 vs f64",
          "pred. exact != qpth-k", "pred. ours != qpth-k f32"]


def deviations(way: int, shot: int, d: int) -> tuple[float, list[dict[str, float]]]:
    """(ridge effect on the exact logits, one row of z / logits deviations per k)."""
    S, Qy, ys, _ = episode(way, shot, d, torch.float64)
    S32, Q32 = S.float(), Qy.float()
    n = way * shot
    Y = F.one_hot(ys, way).double()
    K1 = S @ S.mT + METAOPTNET_DUAL_RIDGE * torch.eye(n, dtype=torch.float64)
    z_star = solve_crammer_singer_dual(K1, Y, C_SVM * Y, tol=1e-12)
    exact = svm_cs_head(Qy, S, ys, way)
    ridge_effect = rel(svm_cs_head(Qy, S, ys, way, dual_ridge=METAOPTNET_DUAL_RIDGE), exact, exact)
    rows = []
    for k in ITERS:
        with torch.no_grad():
            z_q, z_q32 = metaoptnet_alpha(S, ys, way, k), metaoptnet_alpha(S32, ys, way, k)
            z_nat = solve_crammer_singer_dual(K1, Y, C_SVM * Y, max_iter=k)
            z_ours = solve_crammer_singer_dual(K1, Y, C_SVM * Y, max_iter=k, early_stop="qpth")
            l_q, l_q32 = (Qy @ S.mT) @ z_q, (Q32 @ S32.mT) @ z_q32
            l_nat = svm_cs_head(Qy, S, ys, way, max_iter=k)
            l_ours = svm_cs_head(Qy, S, ys, way, max_iter=k, early_stop="qpth")
        rows.append({
            "k": k,
            "z": [rel(z_q, z_star, z_star), rel(z_nat, z_q, z_star), rel(z_ours, z_q, z_star), rel(z_q32, z_q, z_star)],
            "logits": [rel(l_q, exact, exact), rel(l_nat, l_q, exact), rel(l_ours, l_q, exact), rel(l_q32, l_q, exact),
                       float((exact.argmax(-1) != l_q.argmax(-1)).double().mean()),
                       float((l_ours.argmax(-1) != l_q32.argmax(-1)).double().mean())],
        })
    return ridge_effect, rows


def timing(way: int, shot: int, d: int, k: int, repeats: int) -> tuple[float, float, float, float]:
    """(ours s, qpth s, float64 and float32 relative logits differences), float32 forward + backward.

    Agreement is asserted in float64 (qpth's float32 iterates carry its own round-off, reported).
    """
    diffs = []
    for dtype in (torch.float64, torch.float32):
        S, Qy, ys, _ = episode(way, shot, d, dtype)
        with torch.no_grad():
            ref = metaoptnet_logits(Qy, S, ys, way, k)
            diffs.append(rel(svm_cs_head(Qy, S, ys, way, max_iter=k, early_stop="qpth"), ref, ref))
    assert diffs[0] < 1e-4, f"{way}w{shot}s d={d} k={k}: heads differ in float64 (relative {diffs[0]:.2e})"
    S, Qy, ys, yq = episode(way, shot, d, torch.float32)
    S.requires_grad_()
    Qy.requires_grad_()

    def step(logits: torch.Tensor) -> list[torch.Tensor]:
        loss = F.cross_entropy(logits.reshape(-1, way), yq.reshape(-1))
        return list(torch.autograd.grad(loss, (S, Qy)))

    med = interleaved_medians({
        "ours": lambda: step(svm_cs_head(Qy, S, ys, way, max_iter=k, early_stop="qpth")),
        "qpth": lambda: step(metaoptnet_logits(Qy, S, ys, way, k)),
    }, repeats)
    return med["ours"], med["qpth"], diffs[0], diffs[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10, help="timed repetitions (median reported)")
    ap.add_argument("--quick", action="store_true", help="5w1s d=64 and 5w5s d=1600 only, 3 repeats")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    configs = [(5, 1, 64), (5, 5, 1600)] if args.quick else CONFIGS
    repeats = 3 if args.quick else args.repeats
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, B={B} episodes per batch, C={C_SVM}, "
          f"{QUERIES} queries/class; qpth-k: MetaOptNet's code (qpth maxIter=k on kron(K, I) + "
          f"{METAOPTNET_DUAL_RIDGE} I, float64 unless 'f32'); native-k: max_iter=k; ours-k: max_iter=k, "
          "early_stop='qpth'")
    results = {cfg: deviations(*cfg) for cfg in configs}
    print("\nz (dual variables): max |difference| / max |z*|, z* the exact solution of MetaOptNet's QP")
    print("| episode | k | " + " | ".join(Z_COLS) + " |")
    print("|---|---:|" + "---:|" * len(Z_COLS))
    for (way, shot, d), (_, rows) in results.items():
        for r in rows:
            print(f"| {way}w{shot}s d={d} | {r['k']} | " + " | ".join(f"{v:.2g}" for v in r["z"]) + " |")
    print("\nlogits: max |difference| / max |exact logits| (exact: default svm_cs_head, eq. 10 without the "
          "+1.0 I); pred.: fraction of queries whose predicted class differs")
    print("| episode | k | " + " | ".join(L_COLS) + " |")
    print("|---|---:|" + "---:|" * len(L_COLS))
    worst = 0.0
    for (way, shot, d), (_, rows) in results.items():
        for r in rows:
            worst = max(worst, r["z"][2], r["logits"][2])
            print(f"| {way}w{shot}s d={d} | {r['k']} | " + " | ".join(f"{v:.2g}" for v in r["logits"]) + " |")
    print("\nthe +1.0 I alone (exact heads with and without it, logits): "
          + ", ".join(f"{w}w{s}s d={d} {eff:.2g}" for (w, s, d), (eff, _) in results.items()))
    print(f"largest deviation of ours from qpth (float64, z or logits): {worst:.2g} (target < 1e-4)")
    print(f"\nforward + backward of the head (float32, query cross-entropy), median wall seconds per batch of {B} "
          f"episodes over {repeats} interleaved runs (disturbed by other load on a shared machine)")
    print("| episode | k | ours | MetaOptNet qpth | qpth / ours | logits diff f64 | logits diff f32 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for way, shot, d in configs:
        for k in (3, 15):
            t_ours, t_qpth, e64, e32 = timing(way, shot, d, k, repeats)
            print(f"| {way}w{shot}s d={d} | {k} | {t_ours * 1e3:.2f} ms | {t_qpth * 1e3:.2f} ms | "
                  f"{t_qpth / t_ours:.2f}x | {e64:.1e} | {e32:.1e} |")


if __name__ == "__main__":
    main()
