"""Help text of every config field that a command exposes as a flag, per config class.

One place for all commands: a field exposed by two commands (``source_names`` in ``train``
and ``import``) has one help text. Defaults are not written here: the flag adds the
dataclass's own (see :mod:`crosscoders.cli.flags`). argparse formats help with ``%``, so a
literal percent sign is written ``%%``.
"""

from __future__ import annotations

FIELD_HELP: dict[str, dict[str, str]] = {
    "CrosscoderConfig": {
        "activation": "sparsity of the latents",
        "dict_size": "latents in the dictionary (default: --expansion x d_model)",
        "k": "active latents per token for topk, on average for batchtopk",
        "source_names": "e.g. base chat",
    },
    "TrainConfig": {
        "steps": "training steps",
        "batch_size": "tokens per step",
        "lr": "learning rate (default: 2e-4 / sqrt(dict_size / 2^14))",
        "l1_coeff": "sparsity coefficient of relu (L1) and jumprelu (default: 2.0 for relu, "
                    "1.0 for jumprelu)",
        "seed": "initialisation and data-order seed",
        "device": "cpu, cuda, cuda:1 or auto",
        "checkpoint_every": "steps between checkpoints",
        "parallel": "under torchrun: data (the default there) trains one crosscoder on "
                    "every process's slice of each batch; see docs/scaling.md",
        "loggers": "where metrics go: jsonl (metrics.jsonl), wandb, tensorboard; see "
                   "docs/training.md, Tracking",
        "wandb_project": "log to this wandb project (adds the wandb logger)",
        "wandb_entity": "wandb entity (team or user) of the run",
        "wandb_run_name": "wandb display name of the run",
        "tensorboard_dir": "write TensorBoard event files here (adds the tensorboard logger)",
    },
    "ModelSpec": {
        "sites": "sites read from every model: 12, -1, 0.5 (fraction of depth), "
                 "resid_in:3, resid_out:0.5",
        "revision": "hub revision for every model",
    },
    "DataSpec": {
        "text_field": "field of a record that holds its text",
        "messages_field": "field of a record that holds its chat messages",
        "split": "split of a dataset",
        "format": "text, chat (messages formatted with the chat template) or auto (per "
                  "record)",
    },
    "HarvestConfig": {
        "tokens": "tokens to store",
        "context_length": "tokens per context",
        "packing": "pack: documents concatenated into full contexts; doc: one per context",
        "bos": "where a BOS token goes (auto: context if the tokenizer has one)",
        "skip_first": "skip the first n positions of each context",
        "exclude_tokens": "extra tokens never stored (template tokens, ...)",
        "exclude_special": "store special tokens other than BOS/padding (default: excluded)",
        "chat_template_from": "index of the model whose chat template formats chat data",
        "batch_size": "contexts per forward pass",
        "dtype": "model weights dtype",
        "device": "cpu, cuda, cuda:1 or auto",
        "store_dtype": "dtype of the stored activations",
        "shard_tokens": "tokens per shard of the store",
        "eval_tokens": "held-out tokens: count or fraction (<1)",
        "sequential": "run the models one after the other (one in memory at a time)",
    },
    "DiffConfig": {
        "base": "base source (crosscoder source name/index, store source name or model "
                "name)",
        "chat": "chat source, same forms as --base",
        "preset": "category thresholds of the relative decoder norm",
        "latent_scaling": "Latent Scaling for the exclusive latents (auto), every latent or "
                          "none",
        "examples": "collect top-activating examples of the exclusive latents, all or none",
        "n_top": "top-activating examples kept per latent",
        "max_tokens": "analyse only the first N rows",
        "batch_size": "tokens per batch",
        "steer_prompts": "steer the top chat-only latents on this prompt (repeatable)",
        "device": "cpu, cuda or cuda:1",
    },
    "TrulyExclusiveRule": {
        "nu_r_max": "truly chat-only if nu_r below",
        "nu_eps_max": "and nu_eps below",
    },
    "ReportSection": {
        "title": "page title",
        "max_examples": "examples kept per latent",
    },
    "LayersSection": {
        "threshold": "a layer counts towards a latent's span at >= this fraction of its peak "
                     "decoder norm",
        "min_freq": "with --data: count only latents firing on more than this fraction of "
                    "tokens",
        "max_tokens": "tokens of --data to read",
    },
    "ExplainConfig": {
        "max_latents": "at most N latents of each category named (a seeded random pick)",
        "n_explain": "contexts shown to the explainer",
        "n_score": "held-out activating contexts scored, and as many non-activating ones",
        "fuzzing": "also score by fuzzing (marked tokens): one more request a latent",
        "concurrency": "requests in flight at once",
        "requests_per_minute": "at most this many requests a minute",
        "retries": "retries of a failed request",
        "backoff": "seconds before the first retry, doubling after",
        "explain_tokens": "answer length of the explainer",
        "temperature": "sampling temperature",
        "seed": "seed of the latent and context picks",
    },
    "PlantedConfig": {
        "seed": "seed of the planted data",
        "n_shared_shifted": "also plant N shared features 20-70%% stronger in one model "
                            "(scored by the graded view)",
    },
    "DiffingBenchConfig": {
        "activations": "crosscoders to train",
        "steps": "training steps per crosscoder",
        "n_shared_latents": "designated shared latents (tied decoders, reduced L1)",
        "seed": "data and training seed",
        "preset": "category thresholds",
    },
}
