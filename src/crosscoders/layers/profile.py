"""Cross-layer crosscoders: which layers each latent writes to, and how far it persists.

A crosscoder over the residual stream at several layers of one model (sources = layers,
in depth order) finds a feature that persists across layers once. Its per-source decoder
norms ``n_is`` (in the normalised units of training) are its *layer profile*:

* ``peak``: the layer it writes to most;
* ``span``: how many layers it writes to with at least ``threshold`` x its peak norm;
  ``first`` / ``last`` the outermost such layers, ``contiguous`` whether they are all
  consecutive;
* ``effective_layers``: the participation ratio ``(sum_s n_s^2)^2 / sum_s n_s^4``,
  1 for a single-layer latent and S for one spread evenly over S layers (no threshold).

:func:`layer_profile` is a pure function of the weights; ``crosscoders layers RUN --out
DIR`` writes the table (``layers.csv``/``.parquet``), ``summary.json`` and, with
matplotlib, a figure of all profiles.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from crosscoders.data import ActivationSource, as_source, ordered_batches
from crosscoders.diff.stats import check_model_data
from crosscoders.errors import ConfigError
from crosscoders.io import atomic_write, ensure_dir, write_json
from crosscoders.model import Crosscoder


@dataclass
class LayerProfile:
    """Per-latent layer profile (``columns``), the [F, S] relative norms and a summary."""

    columns: dict[str, np.ndarray]
    relative_FS: np.ndarray
    source_names: list[str]
    summary: dict[str, Any] = field(default_factory=dict)

    def to_pandas(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.columns)

    def save(self, out_dir: str | Path, plot: bool = True) -> Path:
        """Write ``layers.csv``, ``layers.parquet`` (with pandas), ``summary.json`` and,
        with matplotlib, ``layers.png``; each atomically."""
        out = ensure_dir(out_dir)
        df = self.to_pandas()
        atomic_write(out / "layers.csv", lambda tmp: df.to_csv(tmp, index=False))
        try:
            atomic_write(out / "layers.parquet", lambda tmp: df.to_parquet(tmp, index=False))
        except ImportError:  # pyarrow is optional
            pass
        write_json(out / "summary.json", self.summary)
        if plot:
            _plot(self, out / "layers.png")
        return out


def firing_frequency(model: Crosscoder, data: ActivationSource | Tensor,
                     max_tokens: int | None = None, batch_size: int = 4096) -> np.ndarray:
    """[F] fraction of tokens on which each latent fires on the first ``max_tokens`` rows of
    ``data`` (a tensor [N, S, D], a store, anything :func:`crosscoders.data.as_source` reads)."""
    source = as_source(data)
    check_model_data(model, source)
    count_F = torch.zeros(model.dict_size, dtype=torch.int64)
    n = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for _, x in ordered_batches(source, batch_size, 0, max_tokens):
                latent_E = model.encode_sparse(x.to(model.W_dec.dtype)).latent_E
                n += len(x)
                count_F += torch.bincount(latent_E.cpu(), minlength=model.dict_size)
    finally:
        model.train(was_training)
    if n == 0:
        raise ConfigError("no tokens to measure firing frequency on; give --data with at least one "
                          "token and --max-tokens >= 1")
    return (count_F.double() / n).numpy()


def layer_profile(model: Crosscoder, threshold: float = 0.5, freq_F: np.ndarray | None = None,
                  min_freq: float = 0.0) -> LayerProfile:
    """The layer profile of every latent of a crosscoder whose sources are layers.

    With ``freq_F`` (see :func:`firing_frequency`) the table gets a ``freq`` column and the
    summary counts only latents that fire on more than ``min_freq`` of the tokens: a
    never-firing latent keeps its random initial decoder, which spreads evenly over the
    layers, and rarely firing ones are often half-trained.
    """
    if not 0 < threshold <= 1:
        raise ConfigError(f"threshold is a fraction of the peak norm: use (0, 1], got {threshold}")
    norms_FS = model.decoder_norms().detach().double().cpu()
    F_, S = norms_FS.shape
    names = list(model.config.names)
    peak_norm_F = norms_FS.max(dim=1).values
    alive = peak_norm_F > 0
    if freq_F is not None:
        alive &= torch.as_tensor(np.asarray(freq_F) > min_freq)
    relative_FS = torch.where(alive[:, None], norms_FS / peak_norm_F.clamp_min(1e-300)[:, None],
                              torch.zeros_like(norms_FS))
    above_FS = relative_FS >= threshold
    span_F = above_FS.sum(1)
    layer_S = torch.arange(S)
    first_F = torch.where(above_FS, layer_S, S).min(1).values
    last_F = torch.where(above_FS, layer_S, -1).max(1).values
    contiguous_F = (last_F - first_F + 1 == span_F) & alive
    sq_FS = norms_FS.pow(2)
    effective_F = sq_FS.sum(1).pow(2) / sq_FS.pow(2).sum(1).clamp_min(1e-300)
    peak_F = norms_FS.argmax(1)
    columns: dict[str, np.ndarray] = {
        "latent": np.arange(F_),
        "peak": peak_F.numpy(),
        "peak_name": np.array([names[i] for i in peak_F.tolist()], dtype=object),
        "span": span_F.numpy(),
        "first": np.where(alive.numpy(), first_F.numpy(), -1),
        "last": last_F.numpy(),
        "contiguous": contiguous_F.numpy(),
        "effective_layers": np.where(alive.numpy(), effective_F.numpy(), 0.0),
    }
    if freq_F is not None:
        columns["freq"] = np.asarray(freq_F, dtype=np.float64)
    for s, name in enumerate(names):
        columns[f"norm/{name}"] = norms_FS[:, s].numpy()
    span_alive = span_F[alive]
    summary = {
        "n_latents": F_,
        "n_counted": int(alive.sum()),
        "counted": f"latents firing on more than {min_freq:g} of the tokens"
        if freq_F is not None
        else "latents with a non-zero decoder (no data given: dead ones included)",
        "n_sources": S,
        "sources": names,
        "threshold": threshold,
        "n_zero_decoder": int((peak_norm_F == 0).sum()),
        "span_counts": {str(n): int((span_alive == n).sum()) for n in range(1, S + 1)},
        "multi_layer_fraction": float((span_alive >= 2).double().mean()) if alive.any() else 0.0,
        "contiguous_fraction_of_multi_layer": (
            float(contiguous_F[alive & (span_F >= 2)].double().mean())
            if bool((alive & (span_F >= 2)).any()) else None),
        "mean_effective_layers": float(effective_F[alive].mean()) if alive.any() else 0.0,
        "peak_counts": {names[s]: int((peak_F[alive] == s).sum()) for s in range(S)},
        "meaning": {
            "span": f"sources with decoder norm >= {threshold} x the latent's peak norm",
            "effective_layers": "participation ratio (sum n^2)^2 / sum n^4: 1 = one layer",
        },
    }
    return LayerProfile(columns, relative_FS.numpy(), names, summary)


def _plot(profile: LayerProfile, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    cols = profile.columns
    order = np.lexsort((-cols["span"], cols["peak"]))  # grouped by peak layer, widest first
    S = len(profile.source_names)
    fig, (ax_map, ax_hist) = plt.subplots(
        1, 2, figsize=(10, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    ax_map.imshow(profile.relative_FS[order].T, aspect="auto", interpolation="nearest",
                  cmap="viridis", vmin=0, vmax=1)
    ax_map.set_yticks(range(S), profile.source_names, fontsize=7)
    ax_map.set_xlabel("latent (sorted by peak layer, then span)")
    ax_map.set_title("decoder norm / peak norm")
    counts = [profile.summary["span_counts"][str(n)] for n in range(1, S + 1)]
    ax_hist.bar(range(1, S + 1), counts)
    ax_hist.set_xlabel(f"span (layers >= {profile.summary['threshold']} x peak)")
    ax_hist.set_ylabel("latents")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
