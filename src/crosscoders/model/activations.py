"""Activation functions, each a small module behind one interface.

Every activation maps pre-activations ``pre_BF`` and the decoder-norm weights ``w_F``
(``w_i = sum_s ||W_dec[i, s]||``) to latent activations ``f_BF``, and says what sparsity
penalty it wants. TopK-style activations select on the norm-weighted values
``relu(pre_i) * w_i`` (so the ranking matches what an L1 penalty would see) and keep the
unweighted ``relu(pre_i)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from crosscoders.model.sparse import batch_topk, topk_per_token


class Activation(nn.Module):
    """Interface: ``forward(pre_BF, w_F) -> f_BF`` and ``sparsity_loss``."""

    #: True when only k latents per token are active (enables the sparse training path)
    is_topk: bool = False

    def forward(self, pre_BF: Tensor, w_F: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def sparsity_loss(self, f_BF: Tensor, pre_BF: Tensor, w_F: Tensor) -> Tensor:
        """Penalty per token, averaged over the batch (0 for TopK-style activations)."""
        return pre_BF.new_zeros(())


class ReLU(Activation):
    """ReLU with the decoder-norm-weighted L1 penalty ``mean_B sum_i f_i w_i``."""

    def forward(self, pre_BF: Tensor, w_F: Tensor) -> Tensor:
        return torch.relu(pre_BF)

    def sparsity_loss(self, f_BF: Tensor, pre_BF: Tensor, w_F: Tensor) -> Tensor:
        return (f_BF @ w_F).mean()


class TopK(Activation):
    """Keep the k largest norm-weighted activations of each token."""

    is_topk = True

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def select(self, scores_BF: Tensor, k: int) -> tuple[Tensor, Tensor]:
        return topk_per_token(scores_BF, k)

    def forward(self, pre_BF: Tensor, w_F: Tensor) -> Tensor:
        return _keep(pre_BF, self.select(torch.relu(pre_BF) * w_F, self.k))


class BatchTopK(Activation):
    """Keep the ``k * B`` largest norm-weighted activations of the whole batch.

    In eval mode a single learned threshold ``theta`` replaces the batch selection, so
    encoding a token does not depend on the rest of its batch: ``f_i = relu(pre_i)`` where
    ``relu(pre_i) * w_i > theta``. ``theta`` is an EMA of the smallest kept weighted value
    during training. Before any training (``theta`` unset) eval mode keeps each token's
    top k.
    """

    is_topk = True

    def __init__(self, k: int, threshold_beta: float = 0.999):
        super().__init__()
        self.k = k
        self.threshold_beta = threshold_beta
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=torch.float64))
        self.register_buffer("threshold_updates", torch.tensor(0, dtype=torch.long))

    @property
    def has_threshold(self) -> bool:
        return bool(self.threshold >= 0)

    def select(self, scores_BF: Tensor, k: int, hint: float | None = None):
        return batch_topk(scores_BF, k * scores_BF.shape[0], hint)

    def forward(self, pre_BF: Tensor, w_F: Tensor) -> Tensor:
        scores_BF = torch.relu(pre_BF) * w_F
        if self.training:
            return _keep(pre_BF, self.select(scores_BF, self.k))
        if not self.has_threshold:
            return _keep(pre_BF, topk_per_token(scores_BF, self.k))
        return torch.where(scores_BF > self.threshold.to(scores_BF.dtype), pre_BF, 0.0)

    @torch.no_grad()
    def update_threshold(self, min_kept_score: float, beta: float | None = None) -> None:
        """Fold the smallest kept weighted activation of a batch into ``theta``.

        A running mean for the first ``1 / (1 - beta)`` updates, an EMA after that, so the
        first batches do not dominate.
        """
        beta = self.threshold_beta if beta is None else beta
        weight = max(1.0 - beta, 1.0 / (float(self.threshold_updates) + 1.0))
        if not self.has_threshold:
            self.threshold.fill_(min_kept_score)
        else:
            self.threshold.mul_(1.0 - weight).add_(weight * min_kept_score)
        self.threshold_updates += 1


class _JumpReLUFn(torch.autograd.Function):
    """f = pre * H(pre - theta); straight-through gradient for theta (rectangle kernel)."""

    @staticmethod
    def forward(ctx, pre_BF, theta_F, bandwidth):  # noqa: D102
        ctx.save_for_backward(pre_BF, theta_F)
        ctx.bandwidth = bandwidth
        return pre_BF * (pre_BF > theta_F)

    @staticmethod
    def backward(ctx, grad_BF):  # noqa: D102
        pre_BF, theta_F = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad_BF * (pre_BF > theta_F)
        # d/dtheta [pre * H(pre - theta)] ~= -(theta / eps) * rect((pre - theta) / eps)
        window = ((pre_BF - theta_F).abs() < eps / 2).to(grad_BF.dtype)
        grad_theta = -(theta_F / eps) * (grad_BF * window).sum(0)
        return grad_pre, grad_theta, None


class JumpReLU(Activation):
    """JumpReLU with learned per-latent thresholds (Anthropic, Jan 2025 update).

    Sparsity penalty ``sum_i tanh(c * f_i * w_i)`` plus the pre-activation loss
    ``lambda_p * sum_i relu(theta_i - pre_i) * w_i`` that revives latents that never fire.
    """

    def __init__(
        self, dict_size: int, init_threshold: float, bandwidth: float, tanh_scale: float,
        preact_coeff: float,
    ):
        super().__init__()
        self.log_threshold = nn.Parameter(torch.full((dict_size,), float(init_threshold)).log())
        self.bandwidth = bandwidth
        self.tanh_scale = tanh_scale
        self.preact_coeff = preact_coeff

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def forward(self, pre_BF: Tensor, w_F: Tensor) -> Tensor:
        return _JumpReLUFn.apply(pre_BF, self.threshold, self.bandwidth)

    def sparsity_loss(self, f_BF: Tensor, pre_BF: Tensor, w_F: Tensor) -> Tensor:
        tanh_term = torch.tanh(self.tanh_scale * f_BF.abs() * w_F).sum(-1).mean()
        preact = (torch.relu(self.threshold - pre_BF) * w_F).sum(-1).mean()
        return tanh_term + self.preact_coeff * preact


def _keep(pre_BF: Tensor, selection: tuple[Tensor, Tensor]) -> Tensor:
    """Dense f with relu(pre) at the selected positions and 0 elsewhere."""
    token_idx, latent_idx = selection
    mask_BF = torch.zeros_like(pre_BF, dtype=torch.bool)
    mask_BF[token_idx, latent_idx] = True
    return torch.where(mask_BF, torch.relu(pre_BF), 0.0)


def make_activation(config) -> Activation:
    """Build the activation named by ``config.activation`` (a CrosscoderConfig)."""
    name = config.activation
    if name == "relu":
        return ReLU()
    if name == "topk":
        return TopK(config.k)
    if name == "batchtopk":
        return BatchTopK(config.k, config.threshold_beta)
    if name == "jumprelu":
        return JumpReLU(
            config.dict_size, config.jumprelu_init_threshold, config.jumprelu_bandwidth,
            config.jumprelu_tanh_scale, config.jumprelu_preact_coeff,
        )
    raise ValueError(f"unknown activation {name!r}")  # config validation catches this first
