"""Training settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from crosscoders.configs import Config
from crosscoders.errors import ConfigError


@dataclass
class TrainConfig(Config):
    """How to train a crosscoder. ``None`` fields take a default that depends on the model.

    Schedules are fractions of ``steps``: LR warms up linearly, stays constant and decays
    linearly to 0 over the last ``lr_decay_frac``; the L1 coefficient warms up linearly
    over ``l1_warmup_frac`` (Anthropic/Kissane); k anneals linearly from ``k_start``.
    """

    steps: int = 5000
    batch_size: int = 2048
    #: None: 2e-4 / sqrt(F / 2^14), the dictionary_learning/sparsify rule of thumb
    lr: float | None = None
    seed: int = 0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    lr_warmup_frac: float = 0.01
    lr_decay_frac: float = 0.2
    #: sparsity coefficient (lambda): L1 for relu, tanh penalty for jumprelu. None: 2.0 / 1.0
    l1_coeff: float | None = None
    l1_warmup_frac: float = 0.05
    k_start: int | None = None
    k_anneal_frac: float = 0.0
    auxk_coeff: float = 1 / 32
    #: dead latents used by AuxK per token; None: d_model // 2
    auxk_k: int | None = None
    #: a latent is dead after this many tokens without firing; None: min(10M, 5% of training)
    dead_after_tokens: int | None = None
    grad_clip: float | None = 1.0
    normalise: bool = True
    norm_sample_tokens: int = 100_000
    init_b_dec_from_mean: bool = True
    #: held-out tokens for periodic evaluation (taken from the data, never trained on)
    eval_tokens: int = 8192
    eval_every: int = 1000
    log_every: int = 50
    checkpoint_every: int = 500
    device: str = "auto"
    #: bf16 autocast (meant for CUDA; works on CPU): GEMMs in bf16, weights and Adam in fp32
    autocast: Literal["none", "bf16"] = "none"
    #: the fast TopK/BatchTopK path; False uses the dense reference (slow, for checks)
    sparse_kernels: bool = True
    #: BatchTopK selection from a bf16 GEMM with fp32 recomputation of the candidates: the
    #: same selection as fp32 (docs/training.md); auto: on for fp32 on CPUs where it pays
    screen: Literal["auto", "on", "off"] = "auto"
    progress: bool = True
    #: batches read ahead on a background thread and copied to the device while the
    #: previous step computes; None: 2 on CUDA, 0 (read inline) on CPU
    prefetch: int | None = None
    #: how the processes torchrun starts share the work (docs/scaling.md): data (each
    #: trains on its slice of every batch), none (one process); auto: data under torchrun
    parallel: Literal["auto", "none", "data"] = "auto"
    #: BatchTopK under data parallelism: global selects the k * B largest entries of the
    #: global batch (as one process would), local the k * B / N of each process's rows
    batchtopk_scope: Literal["global", "local"] = "global"
    #: how long a data-parallel process waits for the others before it stops with an error
    dist_timeout_minutes: float = 10.0
    #: where the metrics go (docs/training.md#tracking): jsonl (metrics.jsonl in the run
    #: directory), wandb (Weights & Biases), tensorboard; the two settings below add theirs
    loggers: list[Literal["jsonl", "wandb", "tensorboard"]] = field(
        default_factory=lambda: ["jsonl"])
    #: Weights & Biases project; setting it turns the wandb logger on
    wandb_project: str | None = None
    #: Weights & Biases entity (user or team); None: the account's default
    wandb_entity: str | None = None
    #: the run's display name in Weights & Biases; None: one wandb makes up
    wandb_run_name: str | None = None
    #: TensorBoard event directory of this run; setting it turns the tensorboard logger on
    #: (tensorboard alone writes to <run_dir>/tensorboard)
    tensorboard_dir: str | None = None

    def validate(self) -> None:
        for name in ("steps", "batch_size", "log_every", "eval_every", "checkpoint_every",
                     "norm_sample_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        for name in ("lr_warmup_frac", "lr_decay_frac", "l1_warmup_frac", "k_anneal_frac"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ConfigError(f"{name} is a fraction of steps: use 0..1, got {value}")
        if self.lr_warmup_frac + self.lr_decay_frac > 1:
            raise ConfigError("lr_warmup_frac + lr_decay_frac must be <= 1")
        if self.eval_tokens < 0:
            raise ConfigError(f"eval_tokens must be >= 0, got {self.eval_tokens}")
        if self.prefetch is not None and self.prefetch < 0:
            raise ConfigError(f"prefetch must be >= 0 batches (0: read inline), got "
                              f"{self.prefetch}")
        if self.k_start is not None and self.k_start < 1:
            raise ConfigError(f"k_start must be >= 1, got {self.k_start}")
        if self.dist_timeout_minutes <= 0:
            raise ConfigError(f"dist_timeout_minutes must be > 0, got "
                              f"{self.dist_timeout_minutes}")

    #: fields that say where the metrics go
    TRACKING_FIELDS = ("loggers", "wandb_project", "wandb_entity", "wandb_run_name",
                       "tensorboard_dir")
    #: fields that may differ when resuming a run (they do not change the result)
    RESUMABLE_CHANGES = ("eval_every", "log_every", "checkpoint_every", "progress", "device",
                         "prefetch", "parallel", "dist_timeout_minutes", *TRACKING_FIELDS)
