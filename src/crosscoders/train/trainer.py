"""The training loop: schedules, dead-latent tracking, evaluation, checkpoints, resume.

A run directory holds ``run.json`` (what is being trained on what), ``checkpoint.pt``
(everything needed to continue exactly: weights, optimizer, step, normalisation, dead
counters, RNG), ``metrics.jsonl`` (and the other loggers' records, see
:mod:`crosscoders.train.tracking`) and, at the end, the crosscoder itself (``config.json``
+ ``model.safetensors``, normalisation folded in). Every file is written atomically, so a
run killed at any moment resumes from its last checkpoint and finishes with the same
weights as an uninterrupted run. ``run.json`` records a fingerprint of the data, so a run
is never continued (or a finished one returned) on other data, and how it was trained
(``"distributed": {"mode": "data", "world_size": N}`` under torchrun, see
:mod:`crosscoders.train.distributed`); in a data-parallel run rank 0 writes every file.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import sys
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from crosscoders.data import (
    ActivationData,
    ActivationSource,
    as_source,
    find_nonfinite,
    shard_rows,
    sharded_batches,
)
from crosscoders.errors import CrosscodersError, DataError, TrainingDiverged
from crosscoders.io import atomic_write, read_json, write_json
from crosscoders.metrics import ReconstructionMetrics
from crosscoders.model import Crosscoder, CrosscoderConfig
from crosscoders.model.activations import BatchTopK
from crosscoders.model.crosscoder import CONFIG_FILE, WEIGHTS_FILE
from crosscoders.model.screen import bf16_screen_available
from crosscoders.train.config import TrainConfig
from crosscoders.train.distributed import DataParallel, GradientReducer, resolve_parallel
from crosscoders.train.loss import LossTerms, SparseStep, StepKnobs, dense_loss
from crosscoders.train.normalise import estimate_scale, scale_from_mean_squared_norm
from crosscoders.train.prefetch import device_batches
from crosscoders.train.tracking import (
    METRICS_FILE,
    TRACKING_FILE,
    Tracking,
    check_loggers,
    open_tracking,
)

RUN_FILE = "run.json"
CHECKPOINT_FILE = "checkpoint.pt"


def train(
    config_or_model: CrosscoderConfig | Crosscoder,
    data: ActivationData,
    train_config: TrainConfig | None = None,
    run_dir: str | Path | None = None,
) -> Crosscoder:
    """Train a crosscoder and return it with normalisation folded in (works on raw data).

    ``data``: a tensor [N, S, D], a ``.safetensors``/``.pt``/``.npy`` file holding one, an
    activation-store directory, or an iterable of [B, S, D] batches. With ``run_dir`` the
    run checkpoints there and calling ``train`` again with the same arguments resumes it.
    A model passed in is copied, never modified. Under ``torchrun`` (``parallel`` auto or
    data) every process calls this with the same arguments and trains its slice of each
    batch; every process returns the same model.
    """
    train_config = train_config or TrainConfig()
    check_loggers(train_config, run_dir)  # a missing wandb/tensorboard fails before any work
    mode = resolve_parallel(train_config.parallel)
    source = as_source(data, train_config.eval_tokens, train_config.batch_size)
    if isinstance(config_or_model, Crosscoder):
        model = copy.deepcopy(config_or_model)
    elif isinstance(config_or_model, CrosscoderConfig):
        model = Crosscoder(config_or_model)
    else:
        raise CrosscodersError(
            f"train() needs a CrosscoderConfig or a Crosscoder, got {type(config_or_model)}"
        )
    if mode == "none":
        return Trainer(model, source, train_config, run_dir).run()
    dp = DataParallel.from_env(train_config.device, train_config.dist_timeout_minutes)
    try:
        return Trainer(model, source, train_config, run_dir, dp).run()
    finally:
        dp.close()


class Trainer:
    def __init__(
        self, model: Crosscoder, source: ActivationSource, config: TrainConfig,
        run_dir: str | Path | None = None, dp: DataParallel | None = None,
    ):
        cc = model.config
        if (source.n_sources, source.d_model) != (cc.n_sources, cc.d_model):
            raise DataError(
                f"data has S={source.n_sources} sources of d_model={source.d_model} but the "
                f"crosscoder expects S={cc.n_sources}, D={cc.d_model}; build the "
                "CrosscoderConfig from the data's shape"
            )
        self.config = config
        self.source = source
        self.run_dir = Path(run_dir) if run_dir is not None else None
        #: data parallelism: this process's rank and the collectives (None: one process)
        self.dp = dp if dp is not None and dp.world_size > 1 else None
        self.distributed = dp.describe() if dp is not None else {"mode": "none",
                                                                  "world_size": 1}
        self.world_size = dp.world_size if dp is not None else 1
        self.is_main = dp is None or dp.is_main
        if self.dp is not None:
            shard_rows(config.batch_size, self.dp.shard)  # an uneven split fails here
        self.device = dp.device if dp is not None else _resolve_device(config.device)
        self.model = model.to(self.device)
        self.scale_S: Tensor | None = None
        if model.is_folded:  # a saved model: train in its normalised units, never fold twice
            self.scale_S = model.unfold_normalisation()
        act = model.activation
        self.is_topk = act.is_topk
        self.lr = config.lr or 2e-4 / math.sqrt(cc.dict_size / 2**14)
        self.l1_coeff = config.l1_coeff if config.l1_coeff is not None else (
            1.0 if cc.activation == "jumprelu" else 2.0
        )
        self.auxk_k = config.auxk_k or max(1, cc.d_model // 2)
        self.dead_after = config.dead_after_tokens or min(
            10_000_000, max(config.batch_size, config.steps * config.batch_size // 20)
        )
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=self.lr, betas=config.adam_betas,
            **_fast_adam_flags(self.device),
        )
        self.step = 0
        self.tokens_since_fired_F = torch.zeros(cc.dict_size, dtype=torch.long,
                                                device=self.device)
        self.threshold_hint: float | None = None
        screen = {"on": True, "off": False}.get(config.screen)
        if screen is None:
            screen = bf16_screen_available(self.device)
        self.sparse_step = SparseStep(screen=screen, dp=self.dp,
                                      batchtopk_scope=config.batchtopk_scope)
        self.reducer = (GradientReducer(self.dp, list(self.model.parameters()))
                        if self.dp is not None else None)
        #: where records go (rank 0 of a run that trains; see run())
        self.tracking = Tracking()

    # ----------------------------------------------------------------- schedules
    def lr_at(self, step: int) -> float:
        c, n = self.config, self.config.steps
        warm, decay = c.lr_warmup_frac * n, c.lr_decay_frac * n
        if warm and step < warm:
            return self.lr * min(1.0, (step + 1) / warm)  # warm < 1 step: no overshoot
        if decay and step >= n - decay:
            return self.lr * max(0.0, (n - step) / decay)
        return self.lr

    def knobs_at(self, step: int) -> StepKnobs:
        c, cc = self.config, self.model.config
        warm = c.l1_warmup_frac * c.steps
        l1 = self.l1_coeff * min(1.0, (step + 1) / warm) if warm else self.l1_coeff
        k = cc.k
        if cc.k is not None and c.k_start is not None and c.k_anneal_frac > 0:
            frac = min(1.0, step / (c.k_anneal_frac * c.steps))
            k = round(c.k_start + (cc.k - c.k_start) * frac)
        dead = self.tokens_since_fired_F >= self.dead_after
        return StepKnobs(
            sparsity_coeff=l1, k=k, auxk_coeff=c.auxk_coeff if self.is_topk else 0.0,
            auxk_k=self.auxk_k, dead_F=dead, threshold_hint=self.threshold_hint,
        )

    # ----------------------------------------------------------------- run
    def run(self) -> Crosscoder:
        resumed = self._open_run_dir()
        if not resumed:
            self.init_from_data()
        if self.dp is not None:  # every rank starts from rank 0's weights, bit for bit
            self.dp.broadcast_([*self.model.state_dict().values(), self.scale_S])
        start_step = self.step if resumed else -1
        c = self.config
        depth = c.prefetch if c.prefetch is not None else (2 if self.device.type == "cuda" else 0)
        shard = self.dp.shard if self.dp is not None else None
        batches = device_batches(
            sharded_batches(self.source, c.batch_size, c.seed, start=self.step, shard=shard),
            self.device, depth)
        try:
            self.tracking = self._open_tracking(resumed)
            with self.tracking:
                final = self._loop(batches, start_step)
                self.tracking.log_summary(final, self.step)
                return final
        finally:
            if hasattr(batches, "close"):
                batches.close()
            if self.reducer is not None:
                self.reducer.remove()

    def _loop(self, batches, start_step: int) -> Crosscoder:
        c = self.config
        bar = tqdm(total=c.steps, initial=self.step, disable=not (c.progress and self.is_main),
                   unit="step", desc="train", dynamic_ncols=True)
        self.model.train()
        while self.step < c.steps:
            x_BSD = next(batches)
            x_BSD = x_BSD * self.scale_S.to(x_BSD.dtype)[:, None]
            terms = self.train_step(x_BSD)
            self.step += 1
            bar.update(1)
            if self.step % c.log_every == 0 or self.step == c.steps:
                record = self._log_record(x_BSD, terms)
                bar.set_postfix(_short(record), refresh=False)
                self.tracking.log(record)
            if self.step % c.eval_every == 0 or self.step == c.steps:
                self.tracking.log(self.evaluate())
            if self.step % c.checkpoint_every == 0 and self.step < c.steps:
                self._save_checkpoint()
        bar.close()
        if self.step != start_step:  # a finished run called again keeps its files as they are
            self._save_checkpoint()
        return self._finish()

    def train_step(self, x_BSD: Tensor) -> LossTerms:
        """One optimizer step on a normalised batch [B, S, D] (``run`` calls it per batch;
        benchmarks time it alone, after :meth:`init_from_data`)."""
        knobs = self.knobs_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        use_sparse = self.is_topk and self.config.sparse_kernels
        with self.autocast():
            if use_sparse:
                terms = self.sparse_step(self.model, x_BSD, knobs)
            else:
                terms = dense_loss(self.model, x_BSD, knobs, self.dp, self.config.batchtopk_scope)
        fired_F = terms.fired_F
        if self.reducer is None:
            if not torch.isfinite(terms.total):
                raise self._diverged(x_BSD, terms.total.item())
            self.optimizer.zero_grad(set_to_none=True)
            terms.total.backward()
        else:
            # the loss is checked once summed over the ranks, so all of them stop together
            self.optimizer.zero_grad(set_to_none=True)
            self.reducer.arm()
            terms.total.backward()
            total, fired = self.reducer.finish([terms.total.detach().float().reshape(1),
                                                terms.fired_F.float()])
            if not bool(torch.isfinite(total).all()):
                raise self._diverged(x_BSD, float(total))
            fired_F = fired > 0  # fired on any rank: the same dead counters everywhere
        self.model.constrain_grads()
        if self.config.grad_clip:
            self.clip_gradients(self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.grad_scale = None
        B = x_BSD.shape[0] * self.world_size
        self.tokens_since_fired_F += B
        self.tokens_since_fired_F[fired_F] = 0
        act = self.model.activation
        min_kept = terms.min_kept_score
        if isinstance(act, BatchTopK) and self.dp is not None:
            kept = torch.tensor(math.inf if min_kept is None else min_kept,
                                dtype=torch.float64, device=self.device)
            kept = float(self.dp.all_reduce_(kept, "min", "the BatchTopK threshold"))
            min_kept = None if math.isinf(kept) else kept
        if isinstance(act, BatchTopK) and min_kept is not None:
            # the EMA window is at most 5% of the run, so short runs get a settled theta
            act.update_threshold(min_kept,
                                 min(act.threshold_beta, 1.0 - 20.0 / self.config.steps))
            # a hint just below the last cut keeps the candidate set small; one that turns
            # out too high costs a second selection pass, never a different result
            margin = 0.975 if self.sparse_step.screen else 0.97
            self.threshold_hint = min_kept * margin
        return terms

    def _diverged(self, x_BSD: Tensor, loss: float) -> CrosscodersError:
        """The error for a non-finite loss: bad data if the batch is not finite, else divergence."""
        ckpt = self.run_dir / CHECKPOINT_FILE if self.run_dir else None
        kept = (f"the last good checkpoint is kept in {ckpt}" if ckpt and ckpt.exists()
                else "no checkpoint had been written yet")
        count, rows, first = self._nonfinite_in_batch(x_BSD)
        if count:
            return DataError(
                f"the data holds non-finite values: the batch of step {self.step} from "
                f"{_data_label(self.source.describe())} has {count} NaN or inf value(s) in "
                f"{rows} row(s), the first at batch row {first}; {kept}. Drop or fix those "
                "rows (or harvest the store again)"
            )
        return TrainingDiverged(
            f"loss became {loss} at step {self.step}; {kept}. Lower the learning rate (now "
            f"{self.lr:g}) or check the data for extreme values (largest |x| in this batch: "
            f"{self._largest_abs(x_BSD):.3g})"
        )

    def _nonfinite_in_batch(self, x_BSD: Tensor) -> tuple[int, int, int]:
        """NaN/inf in the (global) batch: count, rows holding one, first such row or -1."""
        count, rows, first = find_nonfinite(x_BSD)
        if self.dp is None:
            return count, rows, first
        lo, _ = shard_rows(x_BSD.shape[0] * self.world_size, self.dp.shard)
        sums = torch.tensor([count, rows], dtype=torch.float64, device=self.device)
        firsts = torch.tensor([lo + first if first >= 0 else math.inf], dtype=torch.float64,
                              device=self.device)
        self.dp.all_reduce_(sums, what="counting non-finite values")
        self.dp.all_reduce_(firsts, "min", "counting non-finite values")
        first = -1 if math.isinf(float(firsts)) else int(firsts)
        return int(sums[0]), int(sums[1]), first

    def _largest_abs(self, x_BSD: Tensor) -> float:
        largest = x_BSD.abs().max().double().reshape(1)
        if self.dp is not None:
            self.dp.all_reduce_(largest, "max", "the largest value of the batch")
        return float(largest)

    @torch.no_grad()
    def clip_gradients(self, max_norm: float) -> None:
        """Scale gradients to norm ``max_norm`` when above it (as ``clip_grad_norm_``).

        With fused Adam the scale is handed to the optimizer kernel (``grad_scale``, the
        hook GradScaler uses), saving a pass over all gradients.
        """
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        squares = torch.stack([torch.dot(g.reshape(-1), g.reshape(-1)) for g in grads])
        total = float(squares.sum().sqrt())
        if total <= max_norm:
            return
        if self.optimizer.defaults.get("fused"):
            scale = torch.tensor((total + 1e-6) / max_norm, device=self.device)
            self.optimizer.grad_scale = scale  # fused Adam divides every gradient by it
        else:
            torch._foreach_mul_(grads, max_norm / (total + 1e-6))

    def autocast(self) -> torch.autocast:
        """The precision context of a step (bf16 autocast when ``config.autocast`` asks)."""
        enabled = self.config.autocast == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    # ----------------------------------------------------------------- set-up
    def init_from_data(self) -> None:
        """Set the normalisation scale from the data (unless given) and, if configured,
        ``b_dec`` from the data's mean; what a fresh run does before its first step."""
        c = self.config
        sample = None
        if c.normalise and self.scale_S is None:
            known = self.source.mean_squared_norm()
            if known is not None:
                self.scale_S = scale_from_mean_squared_norm(self._finite(known),
                                                            self.model.d_model)
            else:
                sample = self._finite(self.source.sample(c.norm_sample_tokens, c.seed))
                self.scale_S = estimate_scale(sample)
        if self.scale_S is None:
            self.scale_S = torch.ones(self.model.n_sources)
        self.scale_S = self.scale_S.float().to(self.device)
        if c.init_b_dec_from_mean and not self.model.is_folded:
            if sample is None:
                sample = self._finite(self.source.sample(min(c.norm_sample_tokens, 16384),
                                                         c.seed))
            with torch.no_grad():
                mean_SD = (sample.to(self.device).double().mean(0) * self.scale_S[:, None])
                self.model.b_dec.copy_(mean_SD.to(self.model.b_dec.dtype))

    def _finite(self, x: Tensor) -> Tensor:
        """``x`` (a sample or statistics of the data), refused if not finite."""
        if not bool(torch.isfinite(x).all()):  # only sources without up-front checks get here
            raise DataError(
                f"the data holds NaN or inf values: the sample or statistics of "
                f"{_data_label(self.source.describe())} used to initialise training are not "
                "finite; drop or fix those rows (or harvest the store again)"
            )
        return x

    def _open_tracking(self, resumed: bool) -> Tracking:
        """Rank 0's loggers, with the run's settings logged; none for a finished run."""
        if not self.is_main or (resumed and self.step >= self.config.steps):
            return Tracking()
        tracking = open_tracking(self.config, self.run_dir, self.step, resumed)
        try:
            tracking.log_config(self._run_identity())
        except BaseException:
            tracking.close(ok=False)
            raise
        return tracking

    def _run_identity(self) -> dict:
        return {
            "crosscoder": self.model.config.to_dict(),
            "train": self.config.to_dict(),
            "data": self.source.describe(),
        }

    def _open_run_dir(self) -> bool:
        """Check or write run.json; load the checkpoint if there is one.

        Every rank checks the identity (the same files give the same verdict everywhere);
        rank 0 alone writes, and the others read the checkpoint once it has.
        """
        if self.dp is not None:
            self._check_ranks_agree()
        if self.run_dir is None:
            return False
        run_file = self.run_dir / RUN_FILE
        identity = self._run_identity()
        saved = None
        if run_file.exists():
            saved = read_json(run_file, fix="it is not a run file this version can read; "
                                            "train into a new run directory")
            _check_same_run(saved, identity, self.run_dir)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if saved is None:
                saved = {**identity, "distributed": self.distributed}
                write_json(run_file, saved)
            _remove_stale_temporaries(self.run_dir)
        if self.dp is not None:
            self.dp.barrier("waiting for rank 0 to open the run directory")
        ckpt = self.run_dir / CHECKPOINT_FILE
        previous = None
        if ckpt.exists():
            previous = self._load_checkpoint(ckpt)
        if self.is_main:
            self._update_run_file(run_file, saved, identity, previous)
        return ckpt.exists()

    def _check_ranks_agree(self) -> None:
        """Refuse to start when the processes were given other settings or other data."""
        text = json.dumps({**self._run_identity(), "steps": self.config.steps}, sort_keys=True,
                          default=str)
        digests = self.dp.gather_objects(hashlib.sha256(text.encode()).hexdigest())
        other = next((r for r, d in enumerate(digests) if d != digests[0]), None)
        if other is not None:
            raise CrosscodersError(
                f"data-parallel rank {other} was started with other settings or data than "
                "rank 0; start every process with the same command (torchrun does) and the "
                "same data"
            )

    def _update_run_file(self, run_file: Path, saved: dict, identity: dict,
                         previous: dict | None) -> None:
        """Record new data keys and how this run is distributed; say what a change means."""
        changed = False
        unknown = set(identity["data"]) - set(saved.get("data", {}))
        if unknown:  # written before these keys existed: record them from now on
            saved["data"] = {**saved.get("data", {}),
                             **{k: identity["data"][k] for k in unknown}}
            changed = True
        recorded = saved.get("distributed") or {"mode": "none", "world_size": 1}
        previous = previous or recorded
        now = self.distributed
        if _setup(recorded) != _setup(now):
            history = recorded.get("history") or [{"step": 0, **_setup(recorded)}]
            saved["distributed"] = {**now, "history": history + [{"step": self.step, **now}]}
            changed = True
        if changed:
            write_json(run_file, saved)
        if _setup(previous) != _setup(now):
            print(self._resume_note(previous), file=sys.stderr)

    def _resume_note(self, previous: dict) -> str:
        """One line on what resuming with another number of processes changes."""
        B, old, new = self.config.batch_size, _setup(previous), _setup(self.distributed)
        what = (f"resuming {self.run_dir} at step {self.step} on {_processes(new)} instead "
                f"of {_processes(old)}: each now reads {B // new['world_size']} of the {B} "
                "rows of every global batch (the same batches as before)")
        if isinstance(self.model.activation, BatchTopK) and self.config.batchtopk_scope == "local":
            k = self.model.config.k
            return (f"{what}; batchtopk_scope is local, so BatchTopK now selects {k} x "
                    f"{B // new['world_size']} entries per process instead of {k} x "
                    f"{max(1, B // old['world_size'])}: training continues differently than "
                    "it would have")
        return f"{what}; the result is the same up to floating-point rounding"

    def _checkpoint_state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "scale_S": self.scale_S,
            "tokens_since_fired_F": self.tokens_since_fired_F,
            "threshold_hint": self.threshold_hint,
            "torch_rng": torch.get_rng_state(),
            "distributed": self.distributed,
        }

    def _save_checkpoint(self) -> None:
        if self.run_dir is None:
            return
        self.tracking.flush()  # every step up to the checkpoint is logged before it exists
        if self.is_main:
            state = self._checkpoint_state()
            atomic_write(self.run_dir / CHECKPOINT_FILE, lambda tmp: torch.save(state, tmp))
        if self.dp is not None:
            self.dp.barrier("waiting for rank 0 to write the checkpoint")

    def _load_checkpoint(self, path: Path) -> dict:
        """Restore the state; returns how the run that wrote it was distributed."""
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as err:  # a checkpoint is only ever replaced atomically
            raise CrosscodersError(
                f"cannot read checkpoint {path} ({err}); delete it to restart the run"
            ) from None
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        self.scale_S = state["scale_S"].to(self.device)
        self.tokens_since_fired_F = state["tokens_since_fired_F"].to(self.device)
        self.threshold_hint = state["threshold_hint"]
        torch.set_rng_state(state["torch_rng"].cpu())
        return state.get("distributed") or {"mode": "none", "world_size": 1}

    # ----------------------------------------------------------------- logging / eval
    def _log_record(self, x_BSD: Tensor, terms: LossTerms) -> dict:
        """The batch's losses, FVU per source (about the global batch's mean) and L0."""
        metrics = self._metrics()
        metrics.update(x_BSD, terms.xhat_BSD, n_active=round(terms.l0 * x_BSD.shape[0]))
        values = [terms.total.item(), terms.recon.item(), terms.sparsity.item(),
                  terms.auxk.item()]
        if self.dp is not None:  # the global batch: every rank's shares
            values, metrics = self._over_ranks(values, metrics, "the logged metrics")
        result = metrics.result()
        record = {
            "step": self.step, "split": "train", "loss": values[0],
            "recon": values[1], "sparsity": values[2],
            "auxk": values[3], "l0": result.l0,
            "dead_frac": float((self.tokens_since_fired_F >= self.dead_after).float().mean()),
            "lr": self.lr_at(self.step - 1),
        }
        for name, value in zip(self.model.config.names, result.fvu_S):
            record[f"fvu/{name}"] = value
        return record

    @torch.no_grad()
    def evaluate(self) -> dict:
        """FVU per source pooled over the held-out tokens, L0 at inference, dead fraction."""
        metrics = self._metrics()
        self.model.eval()
        batches = self.source.eval_batches(self.config.batch_size)
        if self.dp is not None:  # encoding is per token at eval: each rank takes every N-th
            batches = itertools.islice(batches, self.dp.rank, None, self.world_size)
        for x_BSD in batches:
            x_BSD = x_BSD.to(self.device) * self.scale_S[:, None]
            f_BF = self.model.encode(x_BSD)
            metrics.update(x_BSD, self.model.decode(f_BF), f_BF)
        self.model.train()
        if self.dp is not None:
            _, metrics = self._over_ranks([], metrics, "the evaluation")
        result = metrics.result()
        record = {"step": self.step, "split": "eval", "n_tokens": result.n_tokens}
        if result.n_tokens:
            for name, value in zip(self.model.config.names, result.fvu_S):
                record[f"fvu/{name}"] = value
            record["l0"] = result.l0
        record["dead_frac"] = float((self.tokens_since_fired_F >= self.dead_after).float().mean())
        return record

    def _metrics(self) -> ReconstructionMetrics:
        return ReconstructionMetrics(self.model.n_sources, self.model.d_model,
                                     device=self.device)

    def _over_ranks(self, values: list[float], metrics: ReconstructionMetrics, what: str
                    ) -> tuple[list[float], ReconstructionMetrics]:
        """Every rank's ``values`` summed and ``metrics`` merged, in rank order (so every
        rank gets the same numbers), gathered together."""
        n = len(values)
        mine = torch.cat([torch.tensor(values, dtype=torch.float64, device=self.device),
                          metrics.packed()])
        parts = self.dp.gather_values(mine, what)
        merged = self._metrics()
        for part in parts:
            merged.merge_(part[n:])
        return torch.stack(parts)[:, :n].sum(0).tolist(), merged

    # ----------------------------------------------------------------- finish
    def _finish(self) -> Crosscoder:
        final = copy.deepcopy(self.model).cpu().eval()
        final.fold_normalisation(self.scale_S.cpu())
        final.metadata = {**final.metadata, "train": self.config.to_dict(),
                          "data": self.source.describe(), "steps_trained": self.step}
        if self.run_dir is not None and self.is_main:
            final.save(self.run_dir)
        if self.dp is not None:
            self.dp.barrier("waiting for rank 0 to save the crosscoder")
        return final


def _check_same_run(saved: dict, current: dict, run_dir: Path) -> None:
    allowed = set(TrainConfig.RESUMABLE_CHANGES)
    # a key added to TrainConfig after the run was written takes its default
    defaults = {"train": TrainConfig().to_dict()}
    for section in ("crosscoder", "train", "data"):
        old = {**defaults.get(section, {}), **saved.get(section, {})}
        new = current.get(section, {})
        for key in sorted(set(old) | set(new)):
            if section == "train" and key in allowed:
                continue
            if section == "data" and key not in old:
                continue  # e.g. no fingerprint in a run written before there were any: unknown
            if old.get(key) != new.get(key) and section == "data":
                raise CrosscodersError(
                    f"{run_dir} was trained on other data: its run.json records "
                    f"{_data_label(old)} with {key}={old.get(key)!r}, but this data is "
                    f"{_data_label(new)} with {key}={new.get(key)!r}; use another run "
                    "directory, or the original data to resume it"
                )
            if old.get(key) != new.get(key):
                raise CrosscodersError(
                    f"{run_dir} holds a run with {section}.{key}={old.get(key)!r}, but this "
                    f"run has {new.get(key)!r}; use another run directory, or the original "
                    "settings to resume it"
                )


def _setup(distributed: dict) -> dict:
    """The part of a ``distributed`` record that says how a run trains."""
    return {"mode": distributed.get("mode", "none"),
            "world_size": int(distributed.get("world_size", 1))}


def _processes(setup: dict) -> str:
    """``1 process`` or ``4 data-parallel processes``."""
    n = setup["world_size"]
    if setup["mode"] == "none":
        return "1 process"
    return f"{n} data-parallel process{'es' if n > 1 else ''}"


def _data_label(data: dict) -> str:
    """``file 'acts.pt' (4096 tokens)``: what a run's data was, for error messages."""
    kind, name = data.get("kind"), data.get("path") or data.get("name")
    if kind == "tensor":
        what = "an in-memory tensor" if name == "tensor" else f"file {name!r}"
    else:
        what = f"{(kind or 'data').replace('_', ' ')} {name!r}" if name else kind or "data"
    return f"{what} ({data.get('n_tokens', '?')} tokens)"


def _remove_stale_temporaries(run_dir: Path) -> None:
    """Delete what a killed atomic write of one of the run's files left behind.

    Only ``.<file>.*.tmp`` for the files a run writes (``crosscoders.io.atomic_write``'s
    temporary names) are removed, never anything else in the directory.
    """
    for name in (RUN_FILE, CHECKPOINT_FILE, METRICS_FILE, TRACKING_FILE, CONFIG_FILE,
                 WEIGHTS_FILE):
        for tmp in run_dir.glob(f".{name}.*.tmp"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise CrosscodersError(f"unknown device {device!r}; use auto, cpu or cuda") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise CrosscodersError("device 'cuda' requested but CUDA is not available; use cpu")
    return resolved


def _fast_adam_flags(device: torch.device) -> dict:
    """Fused Adam where this torch build supports it on the device, else foreach."""
    try:
        torch.optim.Adam([torch.zeros(1, device=device, requires_grad=True)], fused=True)
        return {"fused": True}
    except (RuntimeError, TypeError):
        return {"foreach": True}


def _short(record: dict) -> dict:
    out = {"loss": f"{record['loss']:.4g}", "L0": f"{record['l0']:.1f}",
           "dead": f"{record['dead_frac']:.2f}"}
    for key, value in record.items():
        if key.startswith("fvu/"):
            out[key[4:]] = f"{value:.3f}"
    return out
