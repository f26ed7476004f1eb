"""Explain latents of a diff directory with an LLM and score the explanations.

    explain_latents(DIFF_DIR, "chat_only", backend, ExplainConfig(...))

For each chosen latent: the explainer sees its activating contexts (tokens it fires on
marked, activations on a 0-10 scale) and writes a one-phrase explanation; the scorer gets
held-out contexts, half activating and half not, and says which the explanation predicts
(detection; fuzzing optionally). Writes ``explanations.json`` (one record per latent, see
:mod:`crosscoders.interp.results`) and ``explanations_summary.json`` (scores per category)
into DIFF_DIR; the latent table itself is left as ``diff`` wrote it.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np

from crosscoders.configs import Config
from crosscoders.diff.schema import CATEGORY, LATENT, TRULY_CHAT_ONLY, Files, read_latent_table
from crosscoders.errors import ConfigError, CrosscodersError
from crosscoders.interp.backends import Backend
from crosscoders.interp.client import AnswerCache, Asker, Stopped
from crosscoders.interp.contexts import (
    Check,
    LatentContexts,
    negative_pool,
    read_examples,
    split_contexts,
)
from crosscoders.interp.prompts import (
    AnswerError,
    Prompts,
    explain_examples,
    numbered,
    parse_explanation,
    parse_numbers,
)
from crosscoders.interp.results import (
    SUMMARY_FILE,
    json_safe,
    read_explanations,
    write_explanations,
)
from crosscoders.interp.score import (
    balanced_accuracy,
    confusion,
    detection_items,
    fuzzing_items,
)
from crosscoders.io import write_json

CACHE_FILE = "explain_cache.db"
#: what a skip caused by an unreadable answer says to do
PARSE_FIX = ("a larger --model, or clearer instructions in a --prompts file, usually fixes "
             "this")
EXCLUSIVE = ("chat_only", "base_only")


@dataclasses.dataclass
class ExplainConfig(Config):
    """How many contexts the explainer sees and the scorer gets, and how requests are made."""

    n_explain: int = 20  # activating contexts shown to the explainer
    n_score: int = 5  # held-out activating contexts scored (and as many non-activating)
    fuzzing: bool = False  # also the fuzzing score (one more request per latent)
    max_latents: int | None = None  # per category named in --latents (a seeded random pick)
    explain_tokens: int = 120  # answer length of the explainer
    score_tokens: int = 60  # answer length of the scorer
    temperature: float = 0.0
    concurrency: int = 4  # requests in flight at once
    requests_per_minute: float | None = None
    retries: int = 5  # per request, on HTTP 429 / 5xx / connection failures
    backoff: float = 1.0  # seconds before the first retry; doubles each time
    seed: int = 0

    def validate(self) -> None:
        for name in ("n_explain", "n_score", "explain_tokens", "score_tokens", "concurrency"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("retries", "backoff", "temperature"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_latents is not None and self.max_latents < 1:
            raise ConfigError(f"max_latents must be >= 1, got {self.max_latents}")
        if self.requests_per_minute is not None and self.requests_per_minute <= 0:
            raise ConfigError("requests_per_minute must be > 0; leave it out for no limit")


# ------------------------------------------------------------------ choosing latents
def select_latents(spec: str | Sequence[int | str], df: Any, max_per_category: int | None = None,
                   seed: int = 0) -> list[int]:
    """Latent ids from ``spec``: comma-separated categories (``chat_only``, ``base_only``,
    ``shared``, ``other``, ``exclusive`` = both *_only, ``truly_chat_only``, ``all``) and
    latent indices, e.g. ``"chat_only,shared"`` or ``"3,17,42"``."""
    parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else map(str, spec))]
    parts = [p for p in parts if p]
    cats = df[CATEGORY].astype(str).to_numpy()
    ids = df[LATENT].to_numpy().astype(np.int64)
    groups = {c: ids[cats == c] for c in dict.fromkeys(cats)}
    groups["exclusive"] = ids[np.isin(cats, EXCLUSIVE)]
    groups["all"] = ids
    if TRULY_CHAT_ONLY in df.columns:
        groups[TRULY_CHAT_ONLY] = ids[df[TRULY_CHAT_ONLY].fillna(False).astype(bool)]
    known = ["chat_only", "base_only", "shared", "other", "exclusive", "all"]
    chosen: list[int] = []
    for part in parts:
        if part.lstrip("-").isdigit():
            latent = int(part)
            if latent not in set(ids.tolist()):
                raise ConfigError(f"--latents {part}: no such latent; the table has latents "
                                  f"0..{int(ids.max()) if ids.size else -1}")
            chosen.append(latent)
        elif part in groups or part in known:
            group = groups.get(part, ids[:0])
            if max_per_category is not None and len(group) > max_per_category:
                rng = np.random.default_rng([seed, zlib.crc32(part.encode())])
                group = np.sort(rng.choice(group, size=max_per_category, replace=False))
            chosen.extend(int(i) for i in group)
        else:
            raise ConfigError(
                f"--latents {part!r} is neither a category ({', '.join(known)}) nor a latent "
                "index; give e.g. --latents chat_only or --latents 3,17,42")
    if not parts:
        raise ConfigError("--latents is empty; give a category or latent indices")
    return sorted(dict.fromkeys(chosen))


# ------------------------------------------------------------------ one latent
def explain_one(lc: LatentContexts, category: str, asker: Asker, prompts: Prompts,
                cfg: ExplainConfig, log: Callable[[str], None]) -> dict[str, Any]:
    """Explain and score one latent: its record for ``explanations.json``."""
    rec: dict[str, Any] = {
        "latent": lc.latent, "category": category, "explanation": None,
        "detection_score": math.nan, "fuzzing_score": math.nan if cfg.fuzzing else None,
        "n_explain": len(lc.explain), "held_out_rows": [c.row for c in lc.held_out],
        "negative_rows": [c.row for c in lc.negatives],
        "negatives_checked": lc.negatives_checked, "skipped": None,
        "model": asker.backend.identity,
    }
    answer = asker.ask(prompts.messages("explain", examples=explain_examples(lc.explain,
                                                                             lc.max_act)),
                       cfg.explain_tokens, cfg.temperature)
    try:
        rec["explanation"] = parse_explanation(answer)
    except AnswerError as err:
        return _skip(rec, f"explanation answer did not parse ({err}); {PARSE_FIX}", log)
    if not lc.held_out or not lc.negatives:
        return _skip(rec, "too few contexts to score (it needs 2 stored examples and one "
                          "context of another latent); run diff with a larger --n-top", log)
    rng = np.random.default_rng([cfg.seed, lc.latent, 1])
    texts, labels = detection_items(lc.held_out, lc.negatives, rng)
    scored = _score(asker, prompts, "detection", rec["explanation"], texts, labels, cfg)
    if isinstance(scored, AnswerError):
        return _skip(rec, f"detection answer did not parse ({scored}); {PARSE_FIX}", log)
    rec["detection"], rec["detection_score"] = scored
    if cfg.fuzzing:
        texts, labels = fuzzing_items(lc.held_out, rng)
        scored = _score(asker, prompts, "fuzzing", rec["explanation"], texts, labels, cfg)
        if isinstance(scored, AnswerError):
            return _skip(rec, f"fuzzing answer did not parse ({scored}); {PARSE_FIX}", log)
        rec["fuzzing"], rec["fuzzing_score"] = scored
    return rec


def _score(asker: Asker, prompts: Prompts, section: str, explanation: str, texts: list[str],
           labels: list[bool], cfg: ExplainConfig) -> tuple[list[int], float] | AnswerError:
    messages = prompts.messages(section, explanation=explanation, contexts=numbered(texts),
                                n=len(texts))
    answer = asker.ask(messages, cfg.score_tokens, cfg.temperature)
    try:
        chosen = parse_numbers(answer, len(texts))
    except AnswerError as err:
        return err
    predicted = [k + 1 in chosen for k in range(len(texts))]
    return list(confusion(labels, predicted)), balanced_accuracy(labels, predicted)


def _skip(rec: dict[str, Any], reason: str, log: Callable[[str], None]) -> dict[str, Any]:
    rec["skipped"] = reason
    log(f"latent {rec['latent']}: {reason}; skipped")
    return rec


# ------------------------------------------------------------------ many latents
def explain_latents(
    diff_dir: str | Path,
    latents: str | Sequence[int | str],
    backend: Backend,
    config: ExplainConfig | None = None,
    prompts: Prompts | None = None,
    cache: str | Path | None = None,
    tokenizer: Any = None,
    check: Check | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Explain and score ``latents`` of ``diff_dir`` (see :func:`select_latents`); write
    ``explanations.json`` and ``explanations_summary.json``; return the summary.

    ``cache``: the answer cache file (default ``diff_dir/explain_cache.db``). ``check``:
    exact activations for the non-activating contexts
    (:class:`~crosscoders.interp.contexts.ActivationCheck`). Records of latents explained
    by an earlier call are kept (the same latent is replaced). If the backend fails for
    good, the latents finished so far are written before the error is raised.
    """
    cfg = config or ExplainConfig()
    prompts = prompts or Prompts.load()
    log = log or _stderr
    diff_dir = Path(diff_dir)
    if not diff_dir.is_dir():
        raise CrosscodersError(f"{diff_dir} is not a directory; pass the output directory of "
                               "`crosscoders diff`")
    df = read_latent_table(diff_dir)
    chosen = select_latents(latents, df, cfg.max_latents, cfg.seed)
    category = dict(zip(df[LATENT].astype(int), df[CATEGORY].astype(str)))
    examples = read_examples(diff_dir / Files.EXAMPLES, tokenizer)
    missing = [i for i in chosen if i not in examples]
    todo = [i for i in chosen if i in examples]
    if not todo:
        raise CrosscodersError(
            f"none of the {len(chosen)} chosen latents has examples in examples.db; run "
            "`crosscoders diff --examples all` to keep examples of every latent")
    if missing:
        log(f"{len(missing)} of {len(chosen)} chosen latents have no stored examples (diff "
            "keeps them for exclusive latents unless run with --examples all); skipped")
    pool = negative_pool(examples)
    splits = [split_contexts(i, examples[i], pool, cfg.n_explain, cfg.n_score, cfg.seed, check)
              for i in todo]
    asker = Asker(backend, AnswerCache(cache or diff_dir / CACHE_FILE), cfg.retries,
                  cfg.backoff, per_minute=cfg.requests_per_minute)
    records: dict[int, dict[str, Any]] = {}
    try:
        _run_all(splits, category, asker, prompts, cfg, log, records, progress)
    finally:  # also on a backend failure or ^C: keep what was finished
        asker.cache.close()
        summary = _save(diff_dir, records, asker, len(missing), check is not None, backend)
    return summary


def _run_all(splits: list[LatentContexts], category: dict[int, str], asker: Asker,
             prompts: Prompts, cfg: ExplainConfig, log: Callable[[str], None],
             records: dict[int, dict[str, Any]], progress: bool) -> None:
    """Explain ``splits`` with ``cfg.concurrency`` requests in flight, into ``records``.
    The first failure (or ^C) stops new requests; the latents finished by then, and those
    answered from the cache, are still recorded before it is raised."""
    from tqdm.auto import tqdm

    def task(lc: LatentContexts) -> dict[str, Any]:
        try:
            return explain_one(lc, category.get(lc.latent, "other"), asker, prompts, cfg, log)
        except BaseException:
            asker.stop.set()  # before this worker takes the next latent
            raise

    bar = tqdm(total=len(splits), desc="explain", unit="latent", disable=not progress)
    failure: BaseException | None = None
    with ThreadPoolExecutor(max_workers=cfg.concurrency) as pool:
        futures = {pool.submit(task, lc): lc.latent for lc in splits}
        pending = set(futures)
        while pending:
            try:
                done, pending = wait(pending, timeout=0.5)
            except BaseException as err:  # ^C: stop sending, let the workers drain
                asker.stop.set()
                failure = failure or err
                continue
            for f in done:
                err = f.exception()
                if err is None:
                    records[futures[f]] = f.result()
                    bar.update(1)
                elif not isinstance(err, Stopped):
                    failure = failure or err
    bar.close()
    if failure is not None:
        raise failure


def _save(diff_dir: Path, new: dict[int, dict[str, Any]], asker: Asker, n_missing: int,
          checked: bool, backend: Backend) -> dict[str, Any]:
    merged = {int(r["latent"]): r for r in read_explanations(diff_dir)}
    merged.update(new)
    records = list(merged.values())
    write_explanations(diff_dir, records)
    summary = summarize(records)
    summary.update(model=backend.identity, this_run={
        "latents": len(new), "no_examples": n_missing, "negatives_checked": checked,
        "requests_sent": asker.sent, "answers_from_cache": asker.cached})
    write_json(diff_dir / SUMMARY_FILE, json_safe(summary))
    return summary


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Scores per category: counts, mean (with standard error) and median of each score,
    and ``exclusive_minus_shared``: mean detection score of the chat-only and base-only
    latents minus that of the shared ones (negative: exclusive latents are harder to
    explain)."""
    by_cat: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_cat.setdefault(str(r.get("category")), []).append(r)
    out: dict[str, Any] = {"n_latents": len(records), "by_category": {}}
    for cat in sorted(by_cat, key=_category_key):
        recs = by_cat[cat]
        entry: dict[str, Any] = {
            "n": len(recs), "explained": sum(r.get("explanation") is not None for r in recs),
            "skipped": sum(r.get("skipped") is not None for r in recs)}
        for score in ("detection_score", "fuzzing_score"):
            entry.update(_stats(score.removesuffix("_score"), _finite(recs, score)))
        out["by_category"][cat] = entry
    exclusive = [r for r in records if r.get("category") in EXCLUSIVE]
    shared = [r for r in records if r.get("category") == "shared"]
    ex, sh = _finite(exclusive, "detection_score"), _finite(shared, "detection_score")
    out["exclusive_minus_shared"] = (statistics.fmean(ex) - statistics.fmean(sh)
                                     if ex and sh else None)
    return out


def _finite(records: Sequence[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in records
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def _stats(name: str, values: list[float]) -> dict[str, Any]:
    if not values:
        return {f"{name}_scored": 0}
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return {f"{name}_scored": len(values), f"{name}_mean": statistics.fmean(values),
            f"{name}_se": se, f"{name}_median": statistics.median(values)}


def _category_key(cat: str) -> tuple[int, str]:
    order = ("chat_only", "base_only", "shared", "other")
    return (order.index(cat) if cat in order else len(order), cat)


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a small terminal table."""
    run = summary.get("this_run", {})
    lines = [f"explained {run.get('latents', 0)} latents with {summary.get('model')}: "
             f"{run.get('requests_sent', 0)} requests sent, "
             f"{run.get('answers_from_cache', 0)} answers from the cache"]
    fuzz = any("fuzzing_mean" in e for e in summary["by_category"].values())
    head = f"{'category':<12}{'latents':>8}{'scored':>8}{'detection':>18}{'median':>8}"
    lines.append(head + (f"{'fuzzing':>18}" if fuzz else ""))
    for cat, e in summary["by_category"].items():
        row = (f"{cat:<12}{e['n']:>8}{e['detection_scored']:>8}"
               f"{_mean_se(e, 'detection'):>18}{_num(e.get('detection_median')):>8}")
        lines.append(row + (f"{_mean_se(e, 'fuzzing'):>18}" if fuzz else ""))
    diff = summary.get("exclusive_minus_shared")
    if diff is not None:
        lines.append(f"detection, exclusive minus shared: {diff:+.3f} (balanced accuracy; "
                     "0.5 is chance)")
    return "\n".join(lines)


def _mean_se(entry: dict[str, Any], name: str) -> str:
    mean, se = entry.get(f"{name}_mean"), entry.get(f"{name}_se")
    if mean is None:
        return "-"
    return f"{mean:.3f}" + (f" ± {se:.3f}" if se is not None else "")


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)
