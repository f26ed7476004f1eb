"""Causal checks that run the models: splice the reconstruction in, and Minder's patch test.

- :func:`splice_metrics`: replace a model's residual stream at a crosscoder source's site by
  the crosscoder reconstruction and report CE loss recovered
  ``(CE_zero - CE_spliced) / (CE_zero - CE_clean)`` (zero-ablation as the floor) and
  ``KL(clean || spliced)``, per source.
- :func:`patch_test` (Minder et al. 2025): run the base model to the site, add
  ``sum_{i in S} f_i (d_i^chat - d_i^base)`` for each latent set S, let the chat model
  finish, and report ``KL(chat || patched)`` over all tokens and over the first few tokens.
  The empty set (base activation alone) and all latents bracket the result.

Positions the crosscoder never saw (BOS, padding, excluded special tokens: ``keep_BT`` is
False there) keep the model's own activation. Reading the sites reuses the harvester's
block discovery and early-stopping :class:`~crosscoders.harvest.capture.SiteReader`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from crosscoders.errors import ConfigError, DataError
from crosscoders.harvest.capture import SiteReader, hidden_states
from crosscoders.harvest.models import find_blocks
from crosscoders.harvest.sites import Site

if TYPE_CHECKING:
    from crosscoders.model import Crosscoder


@dataclass(frozen=True)
class SourceSite:
    """Where a crosscoder source reads: a model (key into the models dict) and a site."""

    model: str
    site: Site


def sources_from_manifest(sources: Sequence[dict[str, Any]]) -> list[SourceSite]:
    """Source sites from an activation store manifest's ``sources`` (model, kind, layer)."""
    out = []
    for i, s in enumerate(sources):
        if "model" not in s or "kind" not in s or "layer" not in s:
            raise DataError(
                f"store source {i} ({s.get('name')}) does not say its model and site; causal "
                "checks need a store written by crosscoders harvest"
            )
        out.append(SourceSite(str(s["model"]), Site(s["kind"], int(s["layer"]))))
    return out


@contextlib.contextmanager
def replace_at_site(model: nn.Module, site: Site, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """While active, the hidden state at ``site`` is replaced by ``fn(hidden)`` [B, T, D]."""
    _, blocks = find_blocks(model)
    block = blocks[site.layer]

    def post(module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        new = fn(hidden_states(output))
        if isinstance(output, Tensor):
            return new
        if isinstance(output, tuple):
            return (new, *output[1:])
        if isinstance(output, list):
            return [new, *output[1:]]
        output[next(iter(output.keys()))] = new  # ModelOutput-like
        return output

    def pre(module: nn.Module, args: Any, kwargs: Any) -> Any:
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = fn(kwargs["hidden_states"])
        return args, kwargs

    if site.kind == "resid_in":
        handle = block.register_forward_pre_hook(pre, with_kwargs=True)
    else:
        handle = block.register_forward_hook(post, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.inference_mode()
def read_sources(models: dict[str, nn.Module], sources: Sequence[SourceSite],
                 input_ids_BT: Tensor) -> Tensor:
    """Every source's activations on ``input_ids_BT``: [B, T, S, D] (float32)."""
    out: list[Tensor | None] = [None] * len(sources)
    for name in dict.fromkeys(s.model for s in sources):
        if name not in models:
            raise ConfigError(f"no model named {name!r} given; pass models={{'{name}': ...}}")
        which = [i for i, s in enumerate(sources) if s.model == name]
        model = models[name]
        _, blocks = find_blocks(model)
        reader = SiteReader(model, blocks, [sources[i].site for i in which])
        for i, h in zip(which, reader(input_ids_BT.to(_device(model))), strict=True):
            out[i] = h.float()
    return torch.stack(out, dim=2)  # type: ignore[arg-type]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def default_keep(input_ids_BT: Tensor, exclude_ids: Sequence[int] = (), skip_first: int = 0
                 ) -> Tensor:
    """[B, T] positions the crosscoder saw: not an excluded id, not in the first ``skip_first``."""
    keep = ~torch.isin(input_ids_BT, torch.as_tensor(list(exclude_ids), dtype=input_ids_BT.dtype))
    keep[:, :skip_first] = False
    return keep


def _logits(model: nn.Module, input_ids_BT: Tensor) -> Tensor:
    return model(input_ids=input_ids_BT.to(_device(model)), use_cache=False).logits.float()


def _ce_BT(logits_BTV: Tensor, input_ids_BT: Tensor) -> Tensor:
    """Next-token CE at positions 0..T-2, [B, T-1]."""
    return torch.nn.functional.cross_entropy(
        logits_BTV[:, :-1].transpose(1, 2), input_ids_BT[:, 1:].to(logits_BTV.device),
        reduction="none")


def _kl_BT(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """KL(p || q) per position, [B, T]."""
    lp, lq = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def _mean(x: Tensor, mask: Tensor) -> float:
    mask = mask.to(x.device)
    return float((x * mask).sum() / mask.sum().clamp_min(1))


def _encode_BT(crosscoder: Crosscoder, x_BTSD: Tensor, keep_BT: Tensor) -> Tensor:
    """Latent codes [B, T, F] (zero at positions not kept)."""
    B, T, S, D = x_BTSD.shape
    f = torch.zeros(B, T, crosscoder.dict_size, device=x_BTSD.device)
    keep = keep_BT.to(x_BTSD.device)
    if keep.any():
        f[keep] = crosscoder.encode(x_BTSD[keep].to(crosscoder.W_dec.dtype)).float()
    return f


@torch.inference_mode()
def splice_metrics(
    crosscoder: Crosscoder,
    models: dict[str, nn.Module],
    sources: Sequence[SourceSite],
    input_ids_BT: Tensor,
    keep_BT: Tensor | None = None,
    which: Sequence[int] | None = None,
) -> dict[int, dict[str, float]]:
    """Per source s (default all): CE clean / spliced / zero-ablated, CE loss recovered and
    ``KL(clean || spliced)``, averaged over next-token predictions whose input was kept."""
    crosscoder.eval()
    keep = default_keep(input_ids_BT) if keep_BT is None else keep_BT.bool()
    x = read_sources(models, sources, input_ids_BT)
    f = _encode_BT(crosscoder, x, keep)
    xhat = (f.to(crosscoder.W_dec.dtype) @ crosscoder.W_dec.flatten(1)).reshape(*f.shape[:2],
                                                                                 *x.shape[2:])
    xhat = (xhat + crosscoder.b_dec).float()
    results: dict[int, dict[str, float]] = {}
    mask = keep[:, :-1]
    for s in which if which is not None else range(len(sources)):
        model = models[sources[s].model]
        site = sources[s].site
        clean = _logits(model, input_ids_BT)

        def splice(h: Tensor, new: Tensor) -> Tensor:
            k = keep.to(h.device)[..., None]
            return torch.where(k, new.to(h.device, h.dtype), h)

        recon = xhat[:, :, s]
        with replace_at_site(model, site, lambda h, r=recon: splice(h, r)):
            spliced = _logits(model, input_ids_BT)
        with replace_at_site(model, site, lambda h: splice(h, torch.zeros_like(h))):
            ablated = _logits(model, input_ids_BT)
        ce = {k: _mean(_ce_BT(v, input_ids_BT), mask)
              for k, v in (("clean", clean), ("spliced", spliced), ("zero", ablated))}
        gap = ce["zero"] - ce["clean"]
        results[s] = {
            "ce_clean": ce["clean"],
            "ce_spliced": ce["spliced"],
            "ce_zero_ablation": ce["zero"],
            "ce_loss_recovered": (ce["zero"] - ce["spliced"]) / gap if gap != 0 else float("nan"),
            "kl_spliced": _mean(_kl_BT(clean, spliced), keep),
            "kl_zero_ablation": _mean(_kl_BT(clean, ablated), keep),
        }
    return results


def first_kept(keep_BT: Tensor, n: int) -> Tensor:
    """[B, T] mask of the first ``n`` kept positions of each row."""
    return keep_BT & (keep_BT.long().cumsum(1) <= n)


def after_marker(input_ids_BT: Tensor, marker_id: int, n: int) -> Tensor:
    """[B, T] bool: the ``n`` positions right after each occurrence of ``marker_id`` (e.g.
    the first tokens of every assistant response after an ``<|assistant|>`` token)."""
    is_marker = input_ids_BT == marker_id
    # position of the latest marker at or before each position (-1 if none yet)
    pos_T = torch.arange(input_ids_BT.shape[1], device=input_ids_BT.device)
    last_BT = torch.where(is_marker, pos_T, -1).cummax(dim=1).values
    since_BT = pos_T - last_BT
    return (last_BT >= 0) & (since_BT >= 1) & (since_BT <= n)


@torch.inference_mode()
def patch_test(
    crosscoder: Crosscoder,
    models: dict[str, nn.Module],
    sources: Sequence[SourceSite],
    input_ids_BT: Tensor,
    latent_sets: dict[str, Sequence[int] | np.ndarray],
    base: int = 0,
    chat: int = 1,
    keep_BT: Tensor | None = None,
    first_n: int = 5,
    first_BT: Tensor | None = None,
) -> dict[str, dict[str, float]]:
    """Minder's test: ``KL(chat || chat run from the patched base activation)``.

    The chat model's residual at the chat source's site is replaced by
    ``x_base + sum_{i in S} f_i (d_i^chat - d_i^base)`` at kept positions, for every set S
    in ``latent_sets`` plus ``"none"`` (the base activation alone) and ``"all"`` (every
    latent). Returns per set ``kl_all`` (kept positions) and ``kl_first`` (the first
    ``first_n`` kept positions of each sequence, or the positions marked in ``first_BT``,
    e.g. the first tokens of each chat response), and the set size.
    """
    s_base, s_chat = sources[base], sources[chat]
    if s_base.site != s_chat.site:
        raise ConfigError(
            f"the patch test needs the base and chat sources at the same site; got "
            f"{s_base.site.name} and {s_chat.site.name}; give --base and --chat sources at one "
            "site"
        )
    crosscoder.eval()
    keep = default_keep(input_ids_BT) if keep_BT is None else keep_BT.bool()
    x = read_sources(models, sources, input_ids_BT)
    f = _encode_BT(crosscoder, x, keep)
    W = crosscoder.W_dec.detach().float()
    diff_FD = W[:, chat] - W[:, base]
    chat_model = models[s_chat.model]
    clean = _logits(chat_model, input_ids_BT)
    sets = {"none": np.zeros(0, dtype=np.int64), **{k: np.asarray(v, dtype=np.int64)
                                                    for k, v in latent_sets.items()},
            "all": np.arange(crosscoder.dict_size)}
    first = first_kept(keep, first_n) if first_BT is None else first_BT.bool() & keep
    out = {}
    for name, idx in sets.items():
        idx_t = torch.as_tensor(idx, device=f.device)
        patched = x[:, :, base] + f[..., idx_t] @ diff_FD[idx_t].to(f.device)

        def swap(h: Tensor, new: Tensor = patched) -> Tensor:
            return torch.where(keep.to(h.device)[..., None], new.to(h.device, h.dtype), h)

        with replace_at_site(chat_model, s_chat.site, swap):
            logits = _logits(chat_model, input_ids_BT)
        kl = _kl_BT(clean, logits)
        out[name] = {"n_latents": int(len(idx)), "kl_all": _mean(kl, keep),
                     "kl_first": _mean(kl, first)}
    return out
