"""``crosscoders explain DIFF_DIR --latents chat_only|base_only|shared|LIST``: flags over
:func:`crosscoders.interp.explain.explain_latents` (see ``docs/interp.md``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from crosscoders.errors import ConfigError


def add_explain_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``explain`` options to ``parser``."""
    parser.add_argument("diff_dir", help="output directory of `crosscoders diff` (latent "
                                         "table + examples.db); results are written there")
    parser.add_argument("--latents", required=True,
                        help="comma-separated categories (chat_only, base_only, shared, other, "
                             "exclusive, truly_chat_only, all) and/or latent indices")
    where = parser.add_argument_group("the LLM (give --api-base and --model, or --local)")
    where.add_argument("--api-base", help="OpenAI-compatible endpoint, e.g. "
                                          "http://localhost:8000/v1 (vLLM, llama.cpp server, "
                                          "OpenAI)")
    where.add_argument("--model", help="the model name the endpoint serves")
    where.add_argument("--api-key", help="API key (default: $OPENAI_API_KEY; local servers "
                                         "need none)")
    where.add_argument("--local", metavar="PATH", help="a transformers model on this machine "
                                                       "instead: directory, hub id or .gguf")
    where.add_argument("--device", default="cpu", help="device of the --local model")
    where.add_argument("--timeout", type=float, default=120.0,
                       help="seconds to wait for one answer from the endpoint")
    parser.add_argument("--prompts", help="YAML prompts file (copy the default one, see "
                                          "docs/interp.md)")
    parser.add_argument("--max-latents", type=int,
                        help="at most N latents of each category named (a seeded random pick)")
    parser.add_argument("--n-explain", type=int, help="contexts shown to the explainer (20)")
    parser.add_argument("--n-score", type=int, help="held-out activating contexts scored, and "
                                                    "as many non-activating ones (5)")
    parser.add_argument("--fuzzing", action="store_true",
                        help="also score by fuzzing (marked tokens): one more request a latent")
    parser.add_argument("--tokenizer", help="tokenizer to decode examples stored as ids only "
                                            "(diff ran without --models)")
    parser.add_argument("--crosscoder", metavar="RUN_DIR",
                        help="check that the non-activating contexts really are, with the "
                             "crosscoder and the store the diff ran on")
    parser.add_argument("--store", help="with --crosscoder: the activation store (default: "
                                        "the one recorded in the diff's summary.json)")
    parser.add_argument("--concurrency", type=int, help="requests in flight at once (4)")
    parser.add_argument("--rpm", type=float, help="at most this many requests a minute")
    parser.add_argument("--retries", type=int, help="retries of a failed request (5)")
    parser.add_argument("--backoff", type=float,
                        help="seconds before the first retry, doubling after (1)")
    parser.add_argument("--max-tokens", type=int, help="answer length of the explainer (120)")
    parser.add_argument("--temperature", type=float, help="sampling temperature (0)")
    parser.add_argument("--cache", help="answer cache file (default: DIFF_DIR/explain_cache.db)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=explain_from_args)


def _backend(args: argparse.Namespace) -> Any:
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


def _check(args: argparse.Namespace) -> Any:
    if not args.crosscoder:
        if args.store:
            raise ConfigError("--store is used only with --crosscoder RUN_DIR; add it or "
                              "drop --store")
        return None
    from crosscoders import Crosscoder
    from crosscoders.interp.contexts import ActivationCheck
    from crosscoders.io import read_json
    from crosscoders.store import ActivationStore

    store = args.store
    if store is None:
        summary = read_json(Path(args.diff_dir) / "summary.json",
                            "re-run `crosscoders diff`, or pass --store STORE_DIR")
        store = (summary.get("data") or {}).get("path") if isinstance(summary, dict) else None
        if not store or not Path(store).is_dir():
            raise ConfigError(f"{args.diff_dir}/summary.json records no store that exists "
                              "here; pass --store STORE_DIR")
    return ActivationCheck(Crosscoder.load(args.crosscoder), ActivationStore.open(store),
                           device=args.device)


def explain_from_args(args: argparse.Namespace) -> int:
    """Run ``crosscoders explain`` from parsed flags; prints the summary table."""
    from crosscoders.interp.explain import (
        ExplainConfig,
        explain_latents,
        format_summary,
        read_table,
        select_latents,
    )
    from crosscoders.interp.prompts import Prompts
    from crosscoders.interp.results import EXPLANATIONS_FILE, SUMMARY_FILE

    flags = {"max_latents": args.max_latents, "n_explain": args.n_explain,
             "n_score": args.n_score, "concurrency": args.concurrency,
             "requests_per_minute": args.rpm, "retries": args.retries, "backoff": args.backoff,
             "explain_tokens": args.max_tokens, "temperature": args.temperature,
             "seed": args.seed}
    cfg = ExplainConfig(**{k: v for k, v in flags.items() if v is not None},
                        fuzzing=args.fuzzing)
    prompts = Prompts.load(args.prompts)
    if not Path(args.diff_dir).is_dir():
        raise ConfigError(f"{args.diff_dir} is not a directory; pass the output directory of "
                          "`crosscoders diff`")
    # the cheap checks first: a bad --latents fails before a model is loaded
    select_latents(args.latents, read_table(Path(args.diff_dir)), cfg.max_latents, cfg.seed)
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
