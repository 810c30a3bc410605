"""Tests of MetaOptNet's heads (learners.heads): closed forms, peers, gradients, robustness."""
from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from heads_helpers import one_thread  # noqa: F401  (autouse fixture)
from heads_helpers import max_rel, metaoptnet_qpth, relu_features
from sklearn.svm import LinearSVC

from bilevel.qp import solve_crammer_singer_dual
from learners.heads import (
    proto_head,
    r2d2_head,
    ridge_head,
    smooth_labels,
    smoothed_cross_entropy,
    svm_cs_head,
    svm_he_head,
    svm_ww_head,
)
from learners.metaoptnet import MetaOptNet

HEADS = {
    "svm_cs": svm_cs_head,
    "svm_cs_qp": lambda *a, **k: svm_cs_head(*a, solver="qp", **k),
    "ridge": ridge_head,
    "r2d2": r2d2_head,
    "proto": proto_head,
    "svm_he": svm_he_head,
    "svm_ww": svm_ww_head,
}


def episode(gen: torch.Generator, dtype: torch.dtype, B: int, way: int, shot: int, d: int,
            n_query: int = 4, shuffle: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    labels = torch.arange(way).repeat(shot).expand(B, way * shot).clone()
    if shuffle:
        labels = torch.stack([lab[torch.randperm(lab.numel(), generator=gen)] for lab in labels])
    support = torch.randn(B, way * shot, d, generator=gen, dtype=dtype)
    query = torch.randn(B, n_query, d, generator=gen, dtype=dtype)
    return query, support, labels


def cs_primal_objective(W: torch.Tensor, X: torch.Tensor, y: torch.Tensor, C: float) -> torch.Tensor:
    """Eq. (4): 1/2 sum_k |w_k|^2 + C sum_i max_k (1 - [k = y_i] + w_k.x_i - w_{y_i}.x_i)."""
    scores = X @ W.T
    Y = F.one_hot(y, W.shape[0]).to(X.dtype)
    margins = (1 - Y) + scores - (scores * Y).sum(-1, keepdim=True)
    return 0.5 * W.square().sum() + C * margins.amax(-1).clamp_min(0).sum()


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("way, shot, d, C", [(5, 1, 32, 0.1), (5, 5, 64, 0.1), (3, 6, 10, 1.0), (4, 4, 20, 0.01)])
def test_svm_cs_matches_liblinear_primal_objective(gen: torch.Generator, f64: torch.dtype,
                                                   way: int, shot: int, d: int, C: float) -> None:
    """W = sum_i alpha_i f(x_i) reaches LinearSVC(crammer_singer)'s primal optimum (same C scaling)."""
    _, support, labels = episode(gen, f64, 3, way, shot, d)
    Y = F.one_hot(labels, way).to(f64)
    alpha = solve_crammer_singer_dual(support @ support.mT, Y, C * Y)
    W = alpha.mT @ support  # eq. (9)
    for b in range(3):
        clf = LinearSVC(multi_class="crammer_singer", fit_intercept=False, C=C, tol=1e-10, max_iter=100_000)
        with warnings.catch_warnings():  # liblinear may warn at this tolerance; the check is numeric
            warnings.simplefilter("ignore")
            clf.fit(support[b].numpy(), labels[b].numpy())
        ours = cs_primal_objective(W[b], support[b], labels[b], C)
        ref = cs_primal_objective(torch.as_tensor(clf.coef_, dtype=f64), support[b], labels[b], C)
        assert abs(float(ours - ref)) <= 1e-4 * float(ref)
        assert float(ours) <= float(ref) * (1 + 1e-9)  # exact solver: never worse than liblinear


def test_svm_cs_logits_are_primal_scores(gen: torch.Generator, f64: torch.dtype) -> None:
    query, support, labels = episode(gen, f64, 2, 5, 3, 30, n_query=7)
    Y = F.one_hot(labels, 5).to(f64)
    alpha = solve_crammer_singer_dual(support @ support.mT, Y, 0.1 * Y)
    torch.testing.assert_close(svm_cs_head(query, support, labels, 5), query @ (alpha.mT @ support).mT)


def test_ridge_equals_primal_closed_form(gen: torch.Generator, f64: torch.dtype) -> None:
    """Dual ridge (eq. 11) = argmin_W 1/2 |S W - Y|^2 + lam/2 |W|^2 solved in R^d."""
    query, support, labels = episode(gen, f64, 2, 4, 3, 9)
    Y = F.one_hot(labels, 4).to(f64)
    lam = 3.0
    W = torch.linalg.solve(support.mT @ support + lam * torch.eye(9, dtype=f64), support.mT @ Y)
    torch.testing.assert_close(ridge_head(query, support, labels, 4, lam=lam), query @ W, rtol=1e-10, atol=1e-12)


def test_r2d2_equals_dual_ridge(gen: torch.Generator, f64: torch.dtype) -> None:
    query, support, labels = episode(gen, f64, 3, 5, 5, 40)
    torch.testing.assert_close(r2d2_head(query, support, labels, 5), ridge_head(query, support, labels, 5),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("solver", ["native", "qpth"])
def test_ridge_through_qp_layer(gen: torch.Generator, f64: torch.dtype, solver: str) -> None:
    query, support, labels = episode(gen, f64, 2, 5, 2, 16)
    torch.testing.assert_close(ridge_head(query, support, labels, 5, solver=solver),
                               ridge_head(query, support, labels, 5), rtol=1e-7, atol=1e-9)


def test_proto_is_normalised_squared_distance(gen: torch.Generator, f64: torch.dtype) -> None:
    query, support, labels = episode(gen, f64, 2, 3, 4, 6)
    protos = torch.stack([torch.stack([support[b][labels[b] == k].mean(0) for k in range(3)]) for b in range(2)])
    ref = -torch.cdist(query, protos).square()
    torch.testing.assert_close(proto_head(query, support, labels, 3), ref / 6)
    torch.testing.assert_close(proto_head(query, support, labels, 3, normalize=False), ref)


@pytest.mark.parametrize("solver", ["qp", "qpth"])
def test_svm_cs_solvers_agree(gen: torch.Generator, f64: torch.dtype, solver: str) -> None:
    """Structured exact solver == generic native QP == qpth, where qpth works (d >= n)."""
    query, support, labels = episode(gen, f64, 2, 5, 3, 32)
    torch.testing.assert_close(svm_cs_head(query, support, labels, 5, solver=solver),
                               svm_cs_head(query, support, labels, 5), rtol=1e-6, atol=1e-8)


def test_dual_ridge_matches_metaoptnet_construction(gen: torch.Generator, f64: torch.dtype) -> None:
    """dual_ridge=1.0 is MetaOptNet's Q = kron(Gram, I) + 1.0 I (solved by qpth here)."""
    from qpth.qp import QPFunction

    query, support, labels = episode(gen, f64, 2, 5, 2, 16)
    b, n, m = 2, 10, 5
    K = support @ support.mT
    Q = (K[:, :, None, :, None] * torch.eye(m, dtype=f64)[None, None, :, None, :]).reshape(b, n * m, n * m)
    Q = Q + torch.eye(n * m, dtype=f64)  # kron(K, I) + 1.0 I
    Y = F.one_hot(labels, m).to(f64).reshape(b, n * m)
    A = torch.kron(torch.eye(n, dtype=f64), torch.ones(1, m, dtype=f64)).expand(b, -1, -1)
    z = QPFunction(verbose=-1, maxIter=40, eps=1e-14)(Q, -Y, torch.eye(n * m, dtype=f64).expand(b, -1, -1), 0.1 * Y,
                                                       A, torch.zeros(b, n, dtype=f64))
    ref = (query @ support.mT) @ z.reshape(b, n, m)
    torch.testing.assert_close(svm_cs_head(query, support, labels, 5, dual_ridge=1.0), ref, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("head", ["svm_he", "svm_ww"])
def test_optional_svms_match_qpth(gen: torch.Generator, f64: torch.dtype, head: str) -> None:
    query, support, labels = episode(gen, f64, 2, 4, 3, 20)
    fn = HEADS[head]
    torch.testing.assert_close(fn(query, support, labels, 4, solver="qpth"), fn(query, support, labels, 4),
                               rtol=1e-5, atol=1e-7)


def test_svm_he_and_ww_satisfy_their_margins(gen: torch.Generator, f64: torch.dtype) -> None:
    """With a huge C (hard margin) on separable data, the support margins are >= 1."""
    _, support, labels = episode(gen, f64, 1, 3, 3, 30)
    ww = svm_ww_head(support, support, labels, 3, C=1e4)
    own = ww.gather(-1, labels[..., None])
    others = ww.masked_fill(F.one_hot(labels, 3).bool(), -float("inf"))
    assert float((own - others.amax(-1, keepdim=True)).min()) >= 1 - 1e-6
    he = svm_he_head(support, support, labels, 3, C=1e4)
    V = (3 * F.one_hot(labels, 3).to(f64) - 1) / 2
    assert float((he * V).sum(-1).min()) >= 1 - 1e-6


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", list(HEADS))
def test_gradcheck_heads(gen: torch.Generator, f64: torch.dtype, name: str) -> None:
    query, support, labels = episode(gen, f64, 1, 3, 2, 8, n_query=2)
    head = HEADS[name]
    kwargs = {"tol": 1e-12} if name == "svm_cs" else {}

    def f(q, s):
        return head(q, s, labels, 3, **kwargs)

    assert torch.autograd.gradcheck(f, (query.requires_grad_(), support.requires_grad_()),
                                    eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name, param", [("svm_cs", "C"), ("ridge", "lam"), ("r2d2", "lam")])
def test_gradcheck_hyperparameters(gen: torch.Generator, f64: torch.dtype, name: str, param: str) -> None:
    query, support, labels = episode(gen, f64, 2, 3, 3, 12, n_query=3)
    value = torch.tensor(0.1 if param == "C" else 2.0, dtype=f64, requires_grad=True)

    def f(v):
        return HEADS[name](query, support, labels, 3, **{param: v})

    assert torch.autograd.gradcheck(f, (value,), eps=1e-7, atol=1e-6, rtol=1e-4)


def test_svm_cs_central_differences_larger_episode(gen: torch.Generator, f64: torch.dtype) -> None:
    """Directional derivative of the meta-loss vs central differences on a 5-way 5-shot batch."""
    query, support, labels = episode(gen, f64, 4, 5, 5, 64, n_query=10)
    yq = torch.randint(0, 5, (4, 10), generator=gen)
    dS = torch.randn(support.shape, generator=gen, dtype=f64)
    dQ = torch.randn(query.shape, generator=gen, dtype=f64)

    def loss(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(svm_cs_head(q, s, labels, 5, tol=1e-12).reshape(-1, 5), yq.reshape(-1))

    q, s = query.clone().requires_grad_(), support.clone().requires_grad_()
    loss(q, s).backward()
    analytic = float((q.grad * dQ).sum() + (s.grad * dS).sum())
    eps = 1e-6
    numeric = float(loss(query + eps * dQ, support + eps * dS) - loss(query - eps * dQ, support - eps * dS)) / (2 * eps)
    assert abs(analytic - numeric) <= 1e-6 * (1 + abs(numeric))


def test_native_iteration_cap_changes_the_head(gen: torch.Generator, f64: torch.dtype) -> None:
    """max_iter alone caps the native interior-point method: a different, finite, differentiable head."""
    query, support, labels = episode(gen, f64, 2, 5, 5, 64)
    s = support.clone().requires_grad_()
    early = svm_cs_head(query, s, labels, 5, max_iter=3)
    exact = svm_cs_head(query, support, labels, 5)
    assert float((early - exact).detach().abs().max()) > 1e-4
    early.sum().backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("k", [1, 3, 15])
@pytest.mark.parametrize("way, shot, d", [(5, 1, 64), (5, 5, 1600)], ids=["5w1s-d64", "5w5s-d1600"])
def test_svm_cs_qpth_early_stop_matches_metaoptnet_code(gen: torch.Generator, f64: torch.dtype,
                                                        way: int, shot: int, d: int, k: int) -> None:
    """svm_cs_head(max_iter=k, early_stop="qpth") = MetaOptNet's SVM-CS head with qpth maxIter=k.

    Reference: MetaOptNet's code path (qpth on kron(K, I) + 1.0 I, C = 0.1, logits
    ``sum_n alpha[n, k] <s_n, q>``) in float64 on a batch of 3 episodes, 15 queries per class;
    logits and their gradients w.r.t. the support and query embeddings. At k = 15 qpth's own
    float64 round-off limits the gradient agreement (see tests/test_qp.py).
    """
    support, query, labels = relu_features(gen, f64, 3, way, shot, d, n_query=15 * way)
    R = torch.randn(3, 15 * way, way, generator=gen, dtype=f64)

    def run(solver: str) -> tuple[torch.Tensor, ...]:
        s, q = support.clone().requires_grad_(), query.clone().requires_grad_()
        if solver == "metaoptnet":
            logits = (q @ s.mT) @ metaoptnet_qpth(s @ s.mT, labels, way, 0.1, k)
        else:
            logits = svm_cs_head(q, s, labels, way, max_iter=k, early_stop="qpth", solver=solver)
        (logits * R).sum().backward()
        return logits.detach(), s.grad, q.grad

    ref = run("metaoptnet")
    grad_tol = 1e-3 if k == 15 else 1e-8
    for solver in ("native", "qp"):
        for name, a, r, tol in zip(("logits", "dS", "dQ"), run(solver), ref, (1e-5, grad_tol, grad_tol)):
            assert max_rel(a, r) <= tol, (solver, name, max_rel(a, r))
    if k == 3:  # neither the exact head nor the native 3-iteration cap is MetaOptNet's head
        assert max_rel(svm_cs_head(query, support, labels, way), ref[0]) > 1e-4
        assert max_rel(svm_cs_head(query, support, labels, way, max_iter=3), ref[0]) > 1e-2


def test_svm_cs_qpth_early_stop_options(gen: torch.Generator, f64: torch.dtype) -> None:
    query, support, labels = episode(gen, f64, 2, 5, 2, 16)
    # dual_ridge defaults to MetaOptNet's 1.0 with early_stop="qpth", and can be overridden
    torch.testing.assert_close(svm_cs_head(query, support, labels, 5, max_iter=3, early_stop="qpth"),
                               svm_cs_head(query, support, labels, 5, max_iter=3, early_stop="qpth", dual_ridge=1.0))
    assert max_rel(svm_cs_head(query, support, labels, 5, max_iter=3, early_stop="qpth", dual_ridge=0.5),
                svm_cs_head(query, support, labels, 5, max_iter=3, early_stop="qpth")) > 1e-3
    # the qpth solver with early_stop="qpth" is the reference itself
    torch.testing.assert_close(svm_cs_head(query, support, labels, 5, max_iter=3, early_stop="qpth", solver="qpth"),
                               svm_cs_head(query, support, labels, 5, max_iter=3, early_stop="qpth"),
                               rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="give max_iter"):
        svm_cs_head(query, support, labels, 5, early_stop="qpth")
    with pytest.raises(ValueError, match="early_stop must be"):
        svm_cs_head(query, support, labels, 5, max_iter=3, early_stop="qpth3")
    with pytest.raises(ValueError, match="pass early_stop='qpth'"):
        svm_cs_head(query, support, labels, 5, max_iter=3, solver="qpth")
    with pytest.raises(ValueError, match="dual_ridge must be >= 0"):
        svm_cs_head(query, support, labels, 5, dual_ridge=-1.0)


def test_metaoptnet_learner_selects_qpth_early_stopping(gen: torch.Generator, f64: torch.dtype) -> None:
    """MetaOptNet(early_stop="qpth", max_iter=15, eval_max_iter=3): the paper's heads at train / test."""
    torch.manual_seed(0)
    m = MetaOptNet(example_shape=[1, 16, 16], ways=3, backbone_options={"filters": 4}, early_stop="qpth",
                   max_iter=15, eval_max_iter=3, scale=2.0).to(f64)
    sx = torch.rand(2, 6, 1, 16, 16, generator=gen, dtype=f64)
    qx = torch.rand(2, 3, 1, 16, 16, generator=gen, dtype=f64)
    sy = torch.arange(3).repeat(2).expand(2, 6)
    s, q = m.embed_episodes(sx), m.embed_episodes(qx)
    for train, k in ((True, 15), (False, 3)):
        ref = 2.0 * svm_cs_head(q, s, sy, 3, max_iter=k, early_stop="qpth")
        torch.testing.assert_close(m(sx, sy, qx, train=train), ref, rtol=1e-12, atol=1e-12)
    assert max_rel(m(sx, sy, qx, train=False), m(sx, sy, qx, train=True)) > 1e-6
    exact = MetaOptNet(example_shape=[1, 16, 16], ways=3, backbone_options={"filters": 4}, early_stop="qpth",
                       scale=2.0).to(f64)
    exact.load_state_dict(m.state_dict())  # no iteration counts: exact at train and test time
    torch.testing.assert_close(exact(sx, sy, qx, train=False), 2.0 * svm_cs_head(q, s, sy, 3))
    with pytest.raises(ValueError, match="early_stop must be"):
        MetaOptNet(example_shape=[1, 16, 16], ways=3, early_stop="exact")


# ----------------------------------------------------------------------------- robustness


def _robust_episode(gen: torch.Generator, way: int, shot: int, d: int, case: str) -> tuple[torch.Tensor, ...]:
    query, support, labels = episode(gen, torch.float32, 1, way, shot, d, n_query=way * 3)
    if case == "duplicates":
        support[:, shot:] = support[:, :1]  # many copies of one point, with different labels
    elif case == "zeros":
        support, query = torch.zeros_like(support), torch.zeros_like(query)
    elif case == "scaled":
        support, query = 1e3 * support, 1e3 * query
    elif case == "relu":
        support, query = support.relu(), query.relu()
    return query, support, labels


def _check_robust(query: torch.Tensor, support: torch.Tensor, labels: torch.Tensor, way: int,
                  heads: tuple[str, ...] = ("svm_cs", "ridge", "r2d2", "proto")) -> None:
    for name in heads:
        q, s = query.clone().requires_grad_(), support.clone().requires_grad_()
        logits = HEADS[name](q, s, labels, way)
        assert torch.isfinite(logits).all(), name
        logits.square().mean().backward()
        assert torch.isfinite(q.grad).all() and torch.isfinite(s.grad).all(), name


def test_robustness_sample() -> None:
    """~100 random float32 episodes (way {2,5,20} x shot {1,5,15} x d {16,1600}, degenerate cases)."""
    gen = torch.Generator().manual_seed(1234)
    cases = ["plain", "relu", "duplicates", "zeros", "scaled"]
    grid = list(itertools.product([2, 5, 20], [1, 5, 15], [16, 1600]))
    count = 0
    for i, (way, shot, d) in enumerate(grid):
        for case in cases if (way * shot <= 100 or i % 3 == 0) else cases[:2]:
            if way * shot >= 300 and d == 16:
                continue  # 300 points in 16 dims (interior-point fallback, seconds): slow sweep only
            with warnings.catch_warnings():  # rank-deficient Gram matrices may warn; values must be finite
                warnings.simplefilter("ignore")
                _check_robust(*_robust_episode(gen, way, shot, d, case), way)
            count += 1
    assert count >= 70


@pytest.mark.slow
def test_robustness_full_sweep() -> None:
    """1000 random episodes over way {2,5,20}, shot {1,5,15}, d {16,1600,16000} + degenerate cases."""
    gen = torch.Generator().manual_seed(4321)
    cases = ["plain", "relu", "duplicates", "zeros", "scaled"]
    grid = list(itertools.product([2, 5, 20], [1, 5, 15], [16, 1600, 16000], cases))
    for _ in range(1000):
        way, shot, d, case = grid[int(torch.randint(len(grid), (1,), generator=gen))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _check_robust(*_robust_episode(gen, way, shot, d, case), way)


# ----------------------------------------------------------------------------- label smoothing


def test_label_smoothing_convention(gen: torch.Generator, f64: torch.dtype) -> None:
    labels = torch.randint(0, 5, (3, 7), generator=gen)
    t = smooth_labels(labels, 5, 0.1)
    assert torch.allclose(t.sum(-1), torch.ones(3, 7))
    assert torch.allclose(t.gather(-1, labels[..., None]), torch.full((3, 7, 1), 0.9))
    assert torch.allclose(t.amin(-1), torch.full((3, 7), 0.1 / 4))
    logits = torch.randn(3, 7, 5, generator=gen, dtype=f64)
    # PyTorch's convention: eps' / K on every class; equal for eps' = eps K / (K - 1)
    ref = F.cross_entropy(logits.reshape(-1, 5), labels.reshape(-1), label_smoothing=0.1 * 5 / 4)
    torch.testing.assert_close(smoothed_cross_entropy(logits, labels, 0.1), ref)
    torch.testing.assert_close(smoothed_cross_entropy(logits, labels, 0.0),
                               F.cross_entropy(logits.reshape(-1, 5), labels.reshape(-1)))


def test_label_smoothing_bad_input() -> None:
    with pytest.raises(ValueError, match="eps"):
        smooth_labels(torch.zeros(3, dtype=torch.long), 5, 1.0)
    with pytest.raises(ValueError, match="labels must lie"):
        smooth_labels(torch.tensor([0, 5]), 5)
    with pytest.raises(ValueError, match="do not match"):
        smoothed_cross_entropy(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", list(HEADS))
def test_bad_episodes_raise(gen: torch.Generator, f64: torch.dtype, name: str) -> None:
    head = HEADS[name]
    query, support, labels = episode(gen, f64, 2, 3, 2, 5, shuffle=False)
    with pytest.raises(ValueError, match=r"must lie in 0\.\.2"):
        head(query, support, torch.where(labels == 2, 3, labels), 3)
    with pytest.raises(ValueError, match=r"must lie in 0\.\.2"):
        head(query, support, torch.where(labels == 2, -1, labels), 3)
    with pytest.raises(ValueError, match="class 2 has no support example in episode 0"):
        head(query, support, torch.where(labels == 2, 1, labels), 3)
    with pytest.raises(ValueError, match="batch sizes differ"):
        head(query[:1], support, labels, 3)
    with pytest.raises(ValueError, match="feature dims differ"):
        head(query[..., :4], support, labels, 3)
    with pytest.raises(ValueError, match="support_labels must be"):
        head(query, support, labels[:, :-1], 3)
    with pytest.raises(TypeError, match="integer"):
        head(query, support, labels.to(f64), 3)


@pytest.mark.parametrize("name, param", [("svm_cs", "C"), ("svm_cs_qp", "C"), ("svm_he", "C"), ("svm_ww", "C"),
                                         ("ridge", "lam"), ("r2d2", "lam")])
@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_nonpositive_regularisation_raises(gen: torch.Generator, f64: torch.dtype, name: str, param: str,
                                           value: float) -> None:
    query, support, labels = episode(gen, f64, 1, 3, 2, 5)
    with pytest.raises(ValueError, match=f"{param} must be a finite scalar > 0"):
        HEADS[name](query, support, labels, 3, **{param: value})


def test_unknown_solver_raises(gen: torch.Generator, f64: torch.dtype) -> None:
    query, support, labels = episode(gen, f64, 1, 3, 2, 5)
    with pytest.raises(ValueError, match="solver must be"):
        svm_cs_head(query, support, labels, 3, solver="cvxpy")
    with pytest.raises(ValueError, match="solver must be"):
        ridge_head(query, support, labels, 3, solver="lu")
