"""The crosscoder: one sparse dictionary that reads and writes several activation sources.

    pre_BF  = sum_s x_BSD[:, s] @ W_enc_SDF[s] + b_enc_F
    f_BF    = act(pre_BF)                        # ReLU, TopK, BatchTopK, JumpReLU
    xhat_BSD[:, s] = f_BF @ W_dec_FSD[:, s] + b_dec_SD[s]

Each latent i has one decoder vector per source, ``W_dec[i, s]``; how their norms compare
across sources is what model diffing reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from crosscoders.errors import ConfigError, CrosscodersError, DataError
from crosscoders.io import (
    atomic_write,
    ensure_dir,
    read_json,
    read_safetensors,
    write_json,
)
from crosscoders.model.activations import BatchTopK, TopK, make_activation
from crosscoders.model.config import CrosscoderConfig
from crosscoders.model.screen import (
    SCREEN_BLOCK,
    bf16_screen_available,
    screened_above_threshold,
    screened_topk_per_token,
)
from crosscoders.model.sparse import SparseCodes
from crosscoders.model.workspace import Workspace

FORMAT_VERSION = 1


def _home_sources(config: CrosscoderConfig) -> Tensor:
    """Latent i's home layer: floor(i * S / F), i.e. S contiguous, near-equal blocks."""
    return torch.arange(config.dict_size) * config.n_sources // config.dict_size
_FILE_KEYS = {"W_enc_FSD": "W_enc"}
CONFIG_FILE = "config.json"
_MIN_SCREEN_BATCH = 256  # below this the weight conversion outweighs the GEMM saved
WEIGHTS_FILE = "model.safetensors"


class Crosscoder(nn.Module):
    """Crosscoder with ``W_enc`` [S, D, F], ``b_enc`` [F], ``W_dec`` [F, S, D], ``b_dec`` [S, D].

    The encoder parameter is stored latent-major, ``W_enc_FSD`` [F, S, D], so the sparse
    training kernels write its gradient one latent row at a time and fused Adam sees a
    contiguous tensor; ``W_enc`` is its [S, D, F] view (the layout files use).

    Normalisation: a trainer works in units where each source has mean squared norm D.
    :meth:`fold_normalisation` moves those per-source scales into the weights so the model
    works on raw activations; ``folded_scale_S`` records them, so decoder norms keep being
    measured in the normalised units the sparsity penalty saw, and folding twice is refused.
    """

    def __init__(self, config: CrosscoderConfig):
        super().__init__()
        self.config = config
        F_, S, D = config.dict_size, config.n_sources, config.d_model
        gen = torch.Generator().manual_seed(config.seed)
        W_dec_FSD = torch.randn(F_, S, D, generator=gen)
        W_dec_FSD *= config.init_norm / W_dec_FSD.norm(dim=-1, keepdim=True)
        n_shared = config.n_shared_latents
        W_dec_FSD[:n_shared] = W_dec_FSD[:n_shared, :1]  # tied across sources
        self.register_buffer("dec_mask_FS", self._designation_mask(config))
        W_dec_FSD *= self.dec_mask_FS[..., None]
        self.W_dec = nn.Parameter(W_dec_FSD)
        W_enc_FSD = W_dec_FSD.clone()  # encoder = decoder^T
        if config.causality == "weakly_causal":  # a latent reads its home layer only
            home_F = self.home_source_F
            self.register_buffer(
                "enc_mask_FS", (torch.arange(S)[None, :] == home_F[:, None]).float())
            W_enc_FSD *= self.enc_mask_FS[..., None]
        self.W_enc_FSD = nn.Parameter(W_enc_FSD)
        self.b_enc = nn.Parameter(torch.zeros(F_))
        self.b_dec = nn.Parameter(torch.zeros(S, D))
        self.activation = make_activation(config)
        self.register_buffer("folded_scale_S", torch.ones(S))
        #: free-form provenance saved in config.json (models, sites, data): set by pipelines
        self.metadata: dict[str, Any] = {}
        #: bf16-screened exact TopK/BatchTopK inference (docs/training.md): None = where
        #: it pays (measured once per process), False = always the fp32 GEMM
        self.screen_inference: bool | None = None
        self._screen_workspace = Workspace()

    @property
    def home_source_F(self) -> Tensor:
        """[F] the layer each latent of a weakly causal crosscoder reads (contiguous blocks)."""
        return _home_sources(self.config)

    @staticmethod
    def _designation_mask(config: CrosscoderConfig) -> Tensor:
        """[F, S] 1 where latent i may write to source s (0 for other sources' exclusives;
        weakly causal: 0 before the latent's home layer)."""
        if config.causality == "weakly_causal":
            home_F = _home_sources(config)
            return (torch.arange(config.n_sources)[None, :] >= home_F[:, None]).float()
        mask_FS = torch.ones(config.dict_size, config.n_sources)
        start = config.n_shared_latents
        for s, count in enumerate(config.n_exclusive_latents or []):
            mask_FS[start: start + count] = 0
            mask_FS[start: start + count, s] = 1
            start += count
        return mask_FS

    @property
    def has_designated_latents(self) -> bool:
        c = self.config
        return c.n_shared_latents > 0 or any(c.n_exclusive_latents or [])

    @torch.no_grad()
    def constrain_grads(self) -> None:
        """Keep the structure: call between backward and the optimizer step.

        Shared latents get the sum of their per-source gradients on every source (so, with
        identical initial values and optimizer state, their decoders stay exactly tied);
        exclusive latents get no gradient on the sources they may not write to; weakly
        causal latents get none outside their home layer (encoder) or before it (decoder).
        Masked weights start at zero and Adam keeps them there.
        """
        weakly_causal = self.config.causality == "weakly_causal"
        grad = self.W_dec.grad
        if grad is not None and (self.has_designated_latents or weakly_causal):
            n = self.config.n_shared_latents
            grad[:n] = grad[:n].sum(dim=1, keepdim=True)
            grad.mul_(self.dec_mask_FS[..., None])
        if weakly_causal and self.W_enc_FSD.grad is not None:
            self.W_enc_FSD.grad.mul_(self.enc_mask_FS[..., None])

    def sparsity_weights(self) -> Tensor:
        """[F] decoder-norm weights as the sparsity penalty sees them (shared latents scaled)."""
        w_F = self.decoder_norm_weights()
        n = self.config.n_shared_latents
        if n:
            scale_F = torch.ones_like(w_F)
            scale_F[:n] = self.config.shared_sparsity_scale
            w_F = w_F * scale_F
        return w_F

    # ----------------------------------------------------------------- the equations
    @property
    def W_enc(self) -> Tensor:
        """[S, D, F] encoder (a view of the latent-major parameter ``W_enc_FSD``)."""
        return self.W_enc_FSD.permute(1, 2, 0)

    @property
    def n_sources(self) -> int:
        return self.config.n_sources

    @property
    def d_model(self) -> int:
        return self.config.d_model

    @property
    def dict_size(self) -> int:
        return self.config.dict_size

    def decoder_norms(self) -> Tensor:
        """[F, S] norm of each latent's decoder vector per source, in normalised units."""
        return self.W_dec.norm(dim=-1) * self.folded_scale_S

    def decoder_norm_weights(self) -> Tensor:
        """[F] weight ``w_i`` of each latent in the sparsity penalty and TopK ranking."""
        norms_FS = self.decoder_norms()
        if self.config.dec_norm == "concat":
            return norms_FS.pow(2).sum(-1).sqrt()
        return norms_FS.sum(-1)

    def preactivations(self, x_BSD: Tensor) -> Tensor:
        x_BX = self._check_input(x_BSD).flatten(-2)
        S, D, F_ = self.W_enc.shape
        return torch.addmm(self.b_enc, x_BX, self.W_enc.reshape(S * D, F_))

    def encode(self, x_BSD: Tensor) -> Tensor:
        """[..., S, D] activations -> [..., F] latent activations."""
        lead = x_BSD.shape[:-2]
        x_BSD = x_BSD.reshape(-1, *x_BSD.shape[-2:])
        codes = self._screened_codes(x_BSD)
        f_BF = codes.to_dense() if codes is not None else self._dense_codes(x_BSD)
        return f_BF.reshape(*lead, self.dict_size)

    def _dense_codes(self, x_BSD: Tensor) -> Tensor:
        """[B, F] codes through the fp32 GEMM (differentiable)."""
        return self.activation(self.preactivations(x_BSD), self.decoder_norm_weights())

    def encode_sparse(self, x_BSD: Tensor) -> SparseCodes:
        """The non-zero entries of ``encode(x)`` for x [B, S, D], sorted by (token,
        latent). Never forms the dense [B, F] code when the screened selection applies."""
        codes = self._screened_codes(x_BSD)
        if codes is not None:
            return codes
        return SparseCodes.from_dense(self._dense_codes(x_BSD))

    def _screened_codes(self, x_BSD: Tensor) -> SparseCodes | None:
        """Inference by the bf16-screened exact selection (model/screen.py), or None.

        Applies without autograd, in eval mode, in fp32, to TopK and to BatchTopK with a
        positive threshold, where ``screen_inference`` allows it (default: where it pays,
        measured once per process). The result equals the fp32 GEMM's up to fp32 rounding.
        """
        act = self.activation
        if (self.screen_inference is False or torch.is_grad_enabled() or self.training
                or self.dict_size % SCREEN_BLOCK or len(x_BSD) < _MIN_SCREEN_BATCH):
            return None
        if not isinstance(act, (TopK, BatchTopK)) or (
                isinstance(act, BatchTopK) and float(act.threshold) <= 0):
            return None
        x_BX = self._check_input(x_BSD).flatten(-2)
        if x_BX.dtype != torch.float32:
            return None
        # last: the first decision in a process runs the probes
        if self.screen_inference is None and not bf16_screen_available(self.W_enc_FSD.device):
            return None
        F_ = self.dict_size
        W_FX = self.W_enc_FSD.reshape(F_, -1)
        key = tuple(t._version for t in (self.W_enc_FSD, self.W_dec, self.b_enc,
                                          self.folded_scale_S)) + (self.W_enc_FSD.data_ptr(),)
        args = (x_BX, W_FX, self.b_enc, self.decoder_norm_weights())
        workspace = self._screen_workspace
        with workspace.lock:  # the buffers are shared: one encode at a time per model
            if isinstance(act, TopK):
                found = screened_topk_per_token(*args, act.k, workspace, key)
            else:
                found = screened_above_threshold(*args, float(act.threshold), workspace, key)
        return found[0]  # the kept entries' values are their pre-activations

    def decode(self, f_BF: Tensor) -> Tensor:
        """[..., F] latent activations -> [..., S, D] reconstruction."""
        if f_BF.shape[-1] != self.dict_size:
            raise DataError(
                f"decode expects [..., F={self.dict_size}] latent activations, got shape "
                f"{tuple(f_BF.shape)}"
            )
        F_, S, D = self.W_dec.shape
        xhat = f_BF.reshape(-1, F_) @ self.W_dec.reshape(F_, S * D)
        return xhat.reshape(*f_BF.shape[:-1], S, D) + self.b_dec

    def forward(self, x_BSD: Tensor) -> Tensor:
        return self.decode(self.encode(x_BSD))

    def _check_input(self, x: Tensor) -> Tensor:
        S, D = self.n_sources, self.d_model
        if not isinstance(x, Tensor):
            raise DataError(f"expected a torch.Tensor of shape [B, {S}, {D}], got {type(x)}")
        if x.ndim != 3 or tuple(x.shape[1:]) != (S, D):
            raise DataError(
                f"expected activations of shape [B, S={S}, D={D}], got {tuple(x.shape)}; "
                "stack sources on dim 1 (x[:, s] is source s)"
            )
        if not x.is_floating_point():
            raise DataError(
                f"activations must be floating point, got {x.dtype}; convert with x.float()")
        return x.to(self.W_enc.dtype)

    # ----------------------------------------------------------------- normalisation
    @property
    def is_folded(self) -> bool:
        return not bool(torch.all(self.folded_scale_S == 1))

    @torch.no_grad()
    def fold_normalisation(self, scale_S: Tensor) -> None:
        """Fold input scales in: a model trained on ``x * scale`` then works on raw ``x``."""
        if self.is_folded:
            raise CrosscodersError(
                "normalisation is already folded into this crosscoder; call "
                "unfold_normalisation() first"
            )
        scale_S = torch.as_tensor(scale_S, dtype=self.W_enc.dtype, device=self.W_enc.device)
        self.W_enc_FSD.mul_(scale_S[None, :, None])
        self.W_dec.div_(scale_S[None, :, None])
        self.b_dec.div_(scale_S[:, None])
        self.folded_scale_S.copy_(scale_S)

    @torch.no_grad()
    def unfold_normalisation(self) -> Tensor:
        """Undo :meth:`fold_normalisation`; returns the scales that were folded in."""
        scale_S = self.folded_scale_S.clone()
        self.W_enc_FSD.div_(scale_S[None, :, None])
        self.W_dec.mul_(scale_S[None, :, None])
        self.b_dec.mul_(scale_S[:, None])
        self.folded_scale_S.fill_(1.0)
        return scale_S

    # ----------------------------------------------------------------- save / load
    def save(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (each atomically) to ``directory``."""
        directory = ensure_dir(directory, "crosscoder directory")
        tensors = {_FILE_KEYS.get(k, k): v.detach().cpu() for k, v in self.state_dict().items()}
        tensors["W_enc"] = tensors["W_enc"].permute(1, 2, 0)  # files hold W_enc [S, D, F]
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp))
        meta = {
            "format": "crosscoders",
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "normalisation": {
                "folded": self.is_folded,
                "scale": self.folded_scale_S.tolist(),
            },
            "metadata": self.metadata,
        }
        write_json(directory / CONFIG_FILE, meta)
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> Crosscoder:
        """Load a directory written by :meth:`save` (in eval mode, ready for inference).

        ``directory`` may also be a Hugging Face Hub id (``owner/name[/subfolder]``) of such
        a directory, downloaded when no local path of that name exists.
        """
        if not Path(directory).exists():
            from crosscoders.formats.hub import CROSSCODER_FILES, looks_like_hub_id, resolve

            if looks_like_hub_id(str(directory)):
                directory = resolve(directory, files=CROSSCODER_FILES)
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        if not directory.is_dir():
            raise CrosscodersError(
                f"no crosscoder directory at {directory}; check the path: give a directory "
                f"written by `crosscoders train` or Crosscoder.save ({CONFIG_FILE} + "
                f"{WEIGHTS_FILE}), or a Hub id owner/name"
            )
        if not config_path.exists() or not weights_path.exists():
            raise CrosscodersError(
                f"{directory} is not a crosscoder directory: it needs {CONFIG_FILE} and "
                f"{WEIGHTS_FILE}; for a crosscoder saved by another codebase run `crosscoders "
                "import` (see crosscoders.formats)"
            )
        damaged = ("the crosscoder directory is damaged: save it again (Crosscoder.save, or "
                   "re-run `crosscoders train`, which resumes from its checkpoint)")
        meta = read_json(config_path, damaged)
        if not isinstance(meta, dict) or meta.get("format") != "crosscoders":
            raise CrosscodersError(
                f"{config_path} was not written by crosscoders (no 'format': 'crosscoders'); "
                "to import another format use `crosscoders import` or crosscoders.formats"
            )
        if not isinstance(meta.get("config"), dict):
            raise CrosscodersError(f"{config_path} has no 'config' section; {damaged}")
        try:
            config = CrosscoderConfig.from_dict(meta["config"], _path="config")
        except ConfigError as err:
            raise ConfigError(f"{config_path}: {err}; {damaged}") from None
        model = cls(config)
        state = read_safetensors(weights_path, damaged)
        if "W_enc" in state:
            state["W_enc_FSD"] = state.pop("W_enc").permute(2, 0, 1)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if expected != got:
            raise CrosscodersError(
                f"{weights_path} does not match {config_path}: expected tensors {expected}, "
                f"found {got}; the two files come from different models: {damaged}"
            )
        model.load_state_dict(state)
        model.metadata = meta.get("metadata", {})
        return model.to(device).eval()

    # ----------------------------------------------------------------- the Hub
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device: str | torch.device = "cpu",
                        revision: str | None = None, token: str | None = None) -> Crosscoder:
        """Load a crosscoder from the Hugging Face Hub (``owner/name`` or
        ``owner/name/subfolder``, as :meth:`push_to_hub` wrote it) or a local directory.

        Downloads only ``config.json`` and ``model.safetensors`` (cached by huggingface_hub);
        ``revision`` picks a branch, tag or commit. For crosscoders saved by other codebases
        use :func:`crosscoders.formats.import_crosscoder`.
        """
        from crosscoders.formats.hub import CROSSCODER_FILES, resolve

        path = resolve(name_or_path, files=CROSSCODER_FILES, revision=revision, token=token)
        return cls.load(path, device)

    def push_to_hub(self, repo_id: str, *, run_dir: str | Path | None = None,
                    diff_dir: str | Path | None = None, report: str | Path | None = None,
                    private: bool | None = None, token: str | None = None,
                    commit_message: str | None = None, api: Any = None) -> str:
        """Upload this crosscoder with a generated model card to ``owner/name[/subfolder]``
        (the repo is created if missing); returns the URL. ``run_dir`` adds the training
        metrics, ``diff_dir`` the diff table, summaries and report (under ``diff/``); see
        :func:`crosscoders.formats.hub.push_to_hub`."""
        from crosscoders.formats.hub import push_to_hub

        return push_to_hub(self, repo_id, run_dir=run_dir, diff_dir=diff_dir, report=report,
                           private=private, token=token, commit_message=commit_message,
                           api=api)
