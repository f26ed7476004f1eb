"""CKA and SVCCA: invariances, naive formulas, and the streaming layer-by-layer matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crosscoders.diff.similarity import linear_cka, similarity_matrix, source_pairs, svcca
from crosscoders.errors import DataError


@pytest.fixture(scope="module")
def xy():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(300, 12, generator=gen, dtype=torch.float64) @ torch.randn(
        12, 12, generator=gen, dtype=torch.float64)
    Y = X @ torch.randn(12, 10, generator=gen, dtype=torch.float64) + 0.5 * torch.randn(
        300, 10, generator=gen, dtype=torch.float64)
    return X, Y


def _naive_cka(X, Y):
    """HSIC form with token-by-token Gram matrices: tr(KHLH) / sqrt(tr(KHKH) tr(LHLH))."""
    n = len(X)
    H = torch.eye(n, dtype=torch.float64) - 1.0 / n
    K, L = H @ (X @ X.T) @ H, H @ (Y @ Y.T) @ H
    return float((K * L).sum() / torch.sqrt((K * K).sum() * (L * L).sum()))


def test_cka_properties(xy):
    X, Y = xy
    assert linear_cka(X, X) == pytest.approx(1.0)
    assert linear_cka(X, Y) == pytest.approx(_naive_cka(X, Y), rel=1e-10)
    Q, _ = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64))
    assert linear_cka(X, Y @ Q) == pytest.approx(linear_cka(X, Y), rel=1e-10)
    assert linear_cka(3.7 * X, Y + 5.0) == pytest.approx(linear_cka(X, Y), rel=1e-10)
    noise = torch.randn(300, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    assert linear_cka(X, noise) < 0.2 < linear_cka(X, Y) < 1.0


def _naive_svcca(X, Y, dims):
    X, Y = X - X.mean(0), Y - Y.mean(0)
    Xr = X @ torch.linalg.svd(X, full_matrices=False).Vh[:dims].T
    Yr = Y @ torch.linalg.svd(Y, full_matrices=False).Vh[:dims].T
    Qx, Qy = torch.linalg.qr(Xr).Q, torch.linalg.qr(Yr).Q
    return float(torch.linalg.svdvals(Qx.T @ Qy).mean())


def test_svcca_matches_naive_and_invariances(xy):
    X, Y = xy
    for dims in (3, 8):
        assert svcca(X, Y, dims=dims) == pytest.approx(_naive_svcca(X, Y, dims), rel=1e-8)
    assert svcca(X, X) == pytest.approx(1.0)
    A = torch.randn(12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    # CCA is invariant to any invertible linear map when all directions are kept
    assert svcca(X, X @ A, dims=12) == pytest.approx(1.0)


def test_streaming_matrix_matches_direct(xy):
    X, Y = xy
    Y = Y[:, :10]
    acts = torch.stack([X[:, :10], Y, X[:, 2:12]], dim=1)  # [N, 3, 10]
    out = similarity_matrix(acts, [0, 2], [1], dims=5, batch_size=37, progress=False)
    assert out["cka"].shape == (2, 1)
    assert out["cka"][0, 0] == pytest.approx(linear_cka(X[:, :10], Y), rel=1e-9)
    assert out["cka"][1, 0] == pytest.approx(linear_cka(X[:, 2:12], Y), rel=1e-9)
    assert out["svcca"][0, 0] == pytest.approx(svcca(X[:, :10], Y, dims=5), rel=1e-8)


def test_source_pairs_and_errors():
    sources = [{"model": "base", "site": "resid_out:1"}, {"model": "base", "site": "resid_out:3"},
               {"model": "chat", "site": "resid_out:1"}]
    rows, cols, rn, cn = source_pairs(sources, "base", "chat")
    assert (rows, cols, rn, cn) == ([0, 1], [2], ["resid_out:1", "resid_out:3"], ["resid_out:1"])
    with pytest.raises(DataError, match="no sources of model"):
        source_pairs(sources, "base", "instruct")
    with pytest.raises(DataError, match="same tokens"):
        linear_cka(np.zeros((3, 2)), np.zeros((4, 2)))
