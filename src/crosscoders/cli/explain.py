"""``crosscoders explain DIFF_DIR --latents chat_only|base_only|shared|LIST``: LLM
explanations of latents, scored by detection (see ``docs/interp.md``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crosscoders.cli.flags import Field, Option, add_flags, overrides
from crosscoders.cli.shared import NO_PROGRESS
from crosscoders.errors import ConfigError
from crosscoders.interp.explain import ExplainConfig

if TYPE_CHECKING:
    from crosscoders.interp.backends import Backend
    from crosscoders.interp.contexts import ActivationCheck

DIFF_FLAGS = (
    Option("diff_dir", help="output directory of `crosscoders diff` (latent table + "
                            "examples.db); results are written there"),
    Option("--latents", required=True,
           help="comma-separated categories (chat_only, base_only, shared, other, exclusive, "
                "truly_chat_only, all) and/or latent indices"),
)
LLM_FLAGS = (
    Option("--api-base", help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 "
                              "(vLLM, llama.cpp server, OpenAI)"),
    Option("--model", help="the model name the endpoint serves"),
    Option("--api-key", help="API key (default: $OPENAI_API_KEY; local servers need none)"),
    Option("--local", metavar="PATH", help="a transformers model on this machine instead: "
                                           "directory, hub id or .gguf"),
    Option("--device", default="cpu", help="device of the --local model (default: cpu)"),
    Option("--timeout", type=float, default=120.0,
           help="seconds to wait for one answer from the endpoint (default: 120)"),
)
RUN_FLAGS = (
    Option("--prompts", help="YAML prompts file (copy the default one, see docs/interp.md)"),
    Field(ExplainConfig, "max_latents"),
    Field(ExplainConfig, "n_explain"),
    Field(ExplainConfig, "n_score"),
    Field(ExplainConfig, "fuzzing"),
    Option("--tokenizer", help="tokenizer to decode examples stored as ids only (diff ran "
                               "without --models)"),
    Option("--crosscoder", metavar="RUN_DIR",
           help="check that the non-activating contexts really are, with the crosscoder and "
                "the store the diff ran on"),
    Option("--store", help="with --crosscoder: the activation store (default: the one "
                           "recorded in the diff's summary.json)"),
    Field(ExplainConfig, "concurrency"),
    Field(ExplainConfig, "requests_per_minute", flag="--rpm"),
    Field(ExplainConfig, "retries"),
    Field(ExplainConfig, "backoff"),
    Field(ExplainConfig, "explain_tokens", flag="--max-tokens"),
    Field(ExplainConfig, "temperature"),
    Option("--cache", help="answer cache file (default: DIFF_DIR/explain_cache.db)"),
    Field(ExplainConfig, "seed"),
    NO_PROGRESS,
)
FLAGS = DIFF_FLAGS + LLM_FLAGS + RUN_FLAGS


def register(sub: Any) -> None:
    p = sub.add_parser("explain", help="LLM explanations of latents, scored by detection")
    add_flags(p, *DIFF_FLAGS)
    add_flags(p.add_argument_group("the LLM (give --api-base and --model, or --local)"),
              *LLM_FLAGS)
    add_flags(p, *RUN_FLAGS)
    p.set_defaults(func=run)


def _backend(args: argparse.Namespace) -> Backend:
    from crosscoders.interp.backends import EndpointBackend, LocalBackend

    if args.local and (args.api_base or args.model):
        raise ConfigError("give either --local PATH or --api-base URL with --model NAME, not "
                          "both")
    if args.local:
        return LocalBackend(args.local, device=args.device)
    if not args.api_base or not args.model:
        raise ConfigError("no LLM given; pass --api-base URL --model NAME (an OpenAI-"
                          "compatible endpoint) or --local PATH (a transformers model)")
    return EndpointBackend(args.api_base, args.model, args.api_key, timeout=args.timeout)


def _check(args: argparse.Namespace) -> ActivationCheck | None:
    if not args.crosscoder:
        if args.store:
            raise ConfigError("--store is used only with --crosscoder RUN_DIR; add it or "
                              "drop --store")
        return None
    from crosscoders import Crosscoder
    from crosscoders.diff.schema import Files, Summary
    from crosscoders.interp.contexts import ActivationCheck
    from crosscoders.io import read_json
    from crosscoders.store import ActivationStore

    store = args.store
    if store is None:
        summary = read_json(Path(args.diff_dir) / Files.SUMMARY,
                            "re-run `crosscoders diff`, or pass --store STORE_DIR")
        data = summary.get(Summary.DATA) if isinstance(summary, dict) else None
        store = (data or {}).get("path")
        if not store or not Path(store).is_dir():
            raise ConfigError(f"{args.diff_dir}/{Files.SUMMARY} records no store that exists "
                              "here; pass --store STORE_DIR")
    return ActivationCheck(Crosscoder.load(args.crosscoder), ActivationStore.open(store),
                           device=args.device)


def run(args: argparse.Namespace) -> int:
    from crosscoders.diff.schema import read_latent_table
    from crosscoders.interp.explain import explain_latents, format_summary, select_latents
    from crosscoders.interp.prompts import Prompts
    from crosscoders.interp.results import EXPLANATIONS_FILE, SUMMARY_FILE

    cfg = ExplainConfig.from_dict(overrides(args, ExplainConfig, FLAGS))
    prompts = Prompts.load(args.prompts)
    if not Path(args.diff_dir).is_dir():
        raise ConfigError(f"{args.diff_dir} is not a directory; pass the output directory of "
                          "`crosscoders diff`")
    # the cheap checks first: a bad --latents fails before a model is loaded
    select_latents(args.latents, read_latent_table(args.diff_dir), cfg.max_latents, cfg.seed)
    tokenizer = None
    if args.tokenizer:
        from crosscoders.harvest.config import ModelSpec
        from crosscoders.harvest.models import load_tokenizer

        tokenizer = load_tokenizer(ModelSpec(args.tokenizer))
    backend = _backend(args)
    summary = explain_latents(args.diff_dir, args.latents, backend, cfg, prompts,
                              cache=args.cache, tokenizer=tokenizer, check=_check(args),
                              progress=not args.no_progress)
    print(format_summary(summary))
    print(f"wrote {Path(args.diff_dir) / EXPLANATIONS_FILE}, {SUMMARY_FILE}")
    return 0
