"""Holistic baselines: linear CKA and SVCCA between two sets of activations.

Both are functions of second moments, so one streaming pass that accumulates the token
count, the per-source sums and the Gram matrix of all sources ``sum_n x_n x_n^T``
([S*D, S*D], float64) gives every pairwise CKA and SVCCA, for any number of tokens:

- CKA (Kornblith et al. 2019), on centred X, Y: ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)``.
- SVCCA (Raghu et al. 2017): keep each side's top principal directions (``keep`` variance
  fraction or ``dims``), then CCA between the reduced sides; the score is the mean
  canonical correlation. From the covariance: the canonical correlations are the singular
  values of ``Lx^-1/2 Ux^T C_xy Uy Ly^-1/2`` (U, L: the kept eigenvectors and eigenvalues).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from crosscoders.data import ActivationData, as_source, ordered_batches, ordered_stop
from crosscoders.diff.stats import EncodedBatch, check_rows_finite, progress_bar
from crosscoders.errors import DataError


def _centre(x: Tensor) -> Tensor:
    x = torch.as_tensor(x).double()
    if x.ndim != 2:
        raise DataError(f"expected a matrix [N, D], got shape {tuple(x.shape)}")
    return x - x.mean(0)


def linear_cka(X_ND: Tensor, Y_ND: Tensor) -> float:
    """Linear CKA of two [N, D] matrices (rows = the same N tokens; D may differ)."""
    X, Y = _centre(X_ND), _centre(Y_ND)
    if len(X) != len(Y):
        raise DataError(f"X and Y must hold the same tokens; got {len(X)} and {len(Y)} rows")
    return cka_from_cov(X.T @ X, Y.T @ Y, Y.T @ X)


def cka_from_cov(Cxx: Tensor, Cyy: Tensor, Cyx: Tensor) -> float:
    """CKA from centred (co)variance sums ``X^T X``, ``Y^T Y``, ``Y^T X``."""
    denom = torch.linalg.matrix_norm(Cxx) * torch.linalg.matrix_norm(Cyy)
    return float(torch.linalg.matrix_norm(Cyx) ** 2 / denom) if denom > 0 else float("nan")


def _top_directions(C: Tensor, keep: float, dims: int | None) -> tuple[Tensor, Tensor]:
    evals, evecs = torch.linalg.eigh(C)
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    if dims is None:
        frac = evals.cumsum(0) / evals.sum().clamp_min(1e-300)
        dims = int(torch.searchsorted(frac, torch.tensor(keep, dtype=frac.dtype))) + 1
    dims = max(1, min(dims, int((evals > evals[0] * 1e-12).sum())))
    return evals[:dims], evecs[:, :dims]


def svcca_from_cov(
    Cxx: Tensor, Cyy: Tensor, Cyx: Tensor, keep: float = 0.99, dims: int | None = None
) -> tuple[float, np.ndarray]:
    """Mean canonical correlation after SVD reduction, and all correlations, from centred
    (co)variance sums."""
    lx, Ux = _top_directions(Cxx, keep, dims)
    ly, Uy = _top_directions(Cyy, keep, dims)
    if lx[0] <= 0 or ly[0] <= 0:  # a constant side has no directions to correlate
        return float("nan"), np.full(0, np.nan)
    M = (Uy.T @ Cyx @ Ux) / torch.sqrt(ly)[:, None] / torch.sqrt(lx)[None, :]
    rho = torch.linalg.svdvals(M).clamp(0, 1).numpy()
    return float(rho.mean()), rho


def svcca(X_ND: Tensor, Y_ND: Tensor, keep: float = 0.99, dims: int | None = None) -> float:
    """SVCCA of two [N, D] matrices: mean canonical correlation of the top directions."""
    X, Y = _centre(X_ND), _centre(Y_ND)
    return svcca_from_cov(X.T @ X, Y.T @ Y, Y.T @ X, keep, dims)[0]


class GramAccumulator:
    """Streaming count, sums and Gram matrix of the concatenated sources of [B, S, D]."""

    def __init__(self, n_sources: int, d_model: int) -> None:
        self.S, self.D = n_sources, d_model
        self.n = 0
        self.sum_X = torch.zeros(n_sources * d_model, dtype=torch.float64)
        self.gram_XX = torch.zeros(n_sources * d_model, n_sources * d_model, dtype=torch.float64)

    def update_x(self, x_BSD: Tensor) -> None:
        x = x_BSD.reshape(len(x_BSD), -1).double().cpu()
        self.n += len(x)
        self.sum_X += x.sum(0)
        self.gram_XX.addmm_(x.T, x)

    def update(self, batch: EncodedBatch) -> None:  # an analysis-pass consumer
        self.update_x(batch.x_BSD)

    def centred(self) -> Tensor:
        mean = self.sum_X / max(self.n, 1)
        return self.gram_XX - self.n * torch.outer(mean, mean)

    def block(self, C: Tensor, a: int, b: int) -> Tensor:
        D = self.D
        return C[a * D : (a + 1) * D, b * D : (b + 1) * D]


def similarity_matrix(
    data: ActivationData,
    rows: list[int],
    cols: list[int],
    keep: float = 0.99,
    dims: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8192,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """CKA and SVCCA between sources ``rows`` (e.g. base layers) and ``cols`` (chat layers)
    of ``data`` (tensor [N, S, D] or store), in one pass: ``{"cka": [R, C], "svcca": [R, C]}``.
    """
    source = as_source(data)
    stop = ordered_stop(source, max_tokens)
    acc = GramAccumulator(source.n_sources, source.d_model)
    with progress_bar(stop, "similarity", progress) as bar:
        for s, x in ordered_batches(source, batch_size, 0, stop):
            check_rows_finite(source, x, s)
            acc.update_x(x)
            bar.update(len(x))
    return similarity_from_gram(acc, rows, cols, keep, dims)


def similarity_from_gram(
    acc: GramAccumulator,
    rows: list[int],
    cols: list[int],
    keep: float = 0.99,
    dims: int | None = None,
) -> dict[str, np.ndarray]:
    """CKA / SVCCA matrices from a filled :class:`GramAccumulator`."""
    if acc.n < 2:
        raise DataError("need at least 2 tokens for CKA / SVCCA; give more activations")
    C = acc.centred()
    if not bool(torch.isfinite(C).all()):
        raise DataError("the activations hold non-finite values (NaN or inf), so CKA / SVCCA "
                        "are undefined; clean or drop those rows first")
    cka = np.zeros((len(rows), len(cols)))
    cca = np.zeros((len(rows), len(cols)))
    for i, a in enumerate(rows):
        for j, b in enumerate(cols):
            Cxx, Cyy, Cyx = acc.block(C, a, a), acc.block(C, b, b), acc.block(C, b, a)
            cka[i, j] = cka_from_cov(Cxx, Cyy, Cyx)
            cca[i, j] = svcca_from_cov(Cxx, Cyy, Cyx, keep, dims)[0]
    return {"cka": cka, "svcca": cca}


def source_pairs(
    sources: list[dict[str, Any]], base: str, chat: str
) -> tuple[list[int], list[int], list[str], list[str]]:
    """Indices and site names of ``base``'s and ``chat``'s sources in a store manifest's
    ``sources`` list (entries with ``model`` and ``site``)."""
    rows = [i for i, s in enumerate(sources) if s.get("model") == base]
    cols = [i for i, s in enumerate(sources) if s.get("model") == chat]
    if not rows or not cols:
        models = sorted({str(s.get("model")) for s in sources})
        raise DataError(f"the store has no sources of model {base!r} or {chat!r}; it has {models}")
    return (
        rows,
        cols,
        [sources[i].get("site", str(i)) for i in rows],
        [sources[i].get("site", str(i)) for i in cols],
    )
