"""Helpers shared by the QP-layer and head tests (tests/test_qp.py, tests/test_heads.py)."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from bilevel.qp import crammer_singer_qp


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """These problems are tiny: OpenMP threads only spin on shared CI cores (10x slowdowns)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def max_rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |a - ref| / max |ref|``."""
    return float((a - ref).detach().abs().max() / ref.detach().abs().max())


def relu_features(gen: torch.Generator, dtype: torch.dtype, B: int, way: int, shot: int, d: int,
                  n_query: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Post-ReLU-like embeddings: ``relu(class mean + noise)``; returns ``support, query, labels``.

    ``labels`` [B, way * shot] are ``0..way-1`` repeated; the queries are uniform over the classes.
    """
    means = torch.randn(B, way, d, generator=gen, dtype=dtype)
    labels = torch.arange(way).repeat(shot).expand(B, way * shot)
    yq = torch.arange(way).repeat(n_query // way + 1)[:n_query].expand(B, n_query)
    support = torch.relu(means.gather(1, labels[..., None].expand(B, way * shot, d))
                         + torch.randn(B, way * shot, d, generator=gen, dtype=dtype))
    query = torch.relu(means.gather(1, yq[..., None].expand(B, n_query, d))
                       + torch.randn(B, n_query, d, generator=gen, dtype=dtype))
    return support, query, labels


def metaoptnet_qpth(gram: torch.Tensor, labels: torch.Tensor, way: int, C: float | torch.Tensor,
                    max_iter: int) -> torch.Tensor:
    """MetaOptNet's SVM-CS solve as in its code: qpth ``QPFunction(maxIter=max_iter)`` on
    ``kron(K, I) + 1.0 I``, ``p = -Y``, ``G = I``, ``h = C Y``, ``A = kron(I, 1')``, ``b = 0``
    (batched ``G, A, b``). Returns ``alpha [B, n, way]``; differentiable through qpth.
    """
    from qpth.qp import QPFunction

    B, n = labels.shape
    Y = F.one_hot(labels, way).to(gram.dtype)
    Q, p, G, h, A, b = crammer_singer_qp(gram + torch.eye(n, dtype=gram.dtype), Y, C * Y)
    z = QPFunction(verbose=-1, maxIter=max_iter)(Q, p, G.expand(B, -1, -1), h, A.expand(B, -1, -1), b.expand(B, -1))
    return z.reshape(B, n, way)
