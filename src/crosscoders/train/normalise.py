"""Per-source normalisation: one scalar per source so each has mean squared norm D.

Without it the loss is dominated by the source with the largest activations
(docs/training.md, "Normalisation"). The scalars are folded into the saved weights, see
:meth:`crosscoders.Crosscoder.fold_normalisation`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from crosscoders.errors import DataError


def scale_from_mean_squared_norm(mean_sq_norm_S: Tensor, d_model: int) -> Tensor:
    """[S] scales ``c_s = sqrt(D / E||x_s||^2)``."""
    mean_sq_norm_S = torch.as_tensor(mean_sq_norm_S, dtype=torch.float64)
    if not bool(torch.all(mean_sq_norm_S > 0)):
        zero = torch.nonzero(mean_sq_norm_S <= 0).flatten().tolist()
        raise DataError(
            f"source(s) {zero} are all zeros in the normalisation sample; check the harvest "
            "(wrong site or masked-out tokens) or train with normalise=False"
        )
    return (d_model / mean_sq_norm_S).sqrt().float()


def estimate_scale(sample_NSD: Tensor) -> Tensor:
    """[S] normalisation scales from a sample of activations."""
    mean_sq_norm_S = sample_NSD.double().pow(2).sum(-1).mean(0)
    return scale_from_mean_squared_norm(mean_sq_norm_S, sample_NSD.shape[-1])
