"""Small planted datasets for tests."""

import torch


def planted_acts(n=4096, S=2, D=16, n_feat=48, p=0.06, seed=0, noise=0.01):
    """Sparse non-negative combinations of random per-source directions [n, S, D]."""
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_feat, S, D, generator=gen)
    dirs /= dirs.norm(dim=-1, keepdim=True)
    active = torch.rand(n, n_feat, generator=gen) < p
    mags = torch.rand(n, n_feat, generator=gen) * 2 + 0.5
    acts = torch.einsum("nf,fsd->nsd", active * mags, dirs)
    return acts + noise * torch.randn(n, S, D, generator=gen), dirs
