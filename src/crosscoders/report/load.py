"""Read a diffing output directory (and optionally a training run directory) into ReportData.

File names, table columns and JSON keys are those of ``crosscoders.diff.schema``, the names
``crosscoders diff`` writes through; nothing else is looked for. Each file format has its
own small adapter, so a change in a producer touches one function:

==========================  =========================================================
diff dir file               adapter
==========================  =========================================================
latents.parquet / .csv      pandas (``crosscoders.diff.table.LatentTable.save``)
summary.json                as is
examples.db (SQLite)        :func:`examples_from_sqlite` (``diff.examples.save_examples``)
examples.parquet            :func:`examples_from_frame`
similarity.json             :func:`similarity_adapter` (matrices -> named entries)
lens.json                   :func:`lens_adapter`
top_tokens.json             :func:`top_tokens_adapter` ({latent: {model: [[tok, v]]}})
act_hists.json              {latent: [edges, counts]}
explanations.json           ``interp.results.merge_explanations`` (table columns)
==========================  =========================================================

Run dir (``--run``, else ``summary.json``'s ``run_dir``, else the diff dir or its parent):
``metrics.jsonl`` (trainer records), ``run.json`` or ``config.json``. Missing optional files
leave their section out of the report.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from crosscoders.diff.schema import RERUN_FIX, Files, Lens, Similarity, Summary, read_latent_table
from crosscoders.errors import CrosscodersError
from crosscoders.interp.results import merge_explanations
from crosscoders.io import read_json, read_table, unreadable
from crosscoders.report.data import Example, ReportData

#: examples as ``crosscoders diff`` writes them, else from a table of the user's
EXAMPLE_FILES = (Files.EXAMPLES, Files.EXAMPLES_PARQUET)


def load_report_data(
    diff_dir: str | Path,
    run_dir: str | Path | None = None,
    title: str | None = None,
    *,
    max_examples: int = 20,
    token_strings: Callable[[list[int]], list[str]] | None = None,
) -> ReportData:
    """Everything the report shows, from ``diff_dir`` and (found or given) ``run_dir``.

    ``token_strings`` maps token ids to strings for examples stored without their text
    (e.g. ``tokenizer.convert_ids_to_tokens``); without it such tokens show as ``⟨id⟩``.
    """
    diff_dir = Path(diff_dir)
    if not diff_dir.is_dir():
        raise CrosscodersError(
            f"{diff_dir} is not a directory; pass the output directory of `crosscoders diff`"
        )
    summary = _read_json(diff_dir / Files.SUMMARY) or {}
    latents = merge_explanations(read_latent_table(diff_dir), diff_dir)  # `explain`'s columns
    data = ReportData(latents=latents, summary=summary)

    found = _first(diff_dir, EXAMPLE_FILES)
    if found is not None:
        if found.suffix == ".parquet":
            data.examples = examples_from_frame(read_table(found, RERUN_FIX), max_examples,
                                                token_strings)
        else:
            data.examples = examples_from_sqlite(found, max_examples, token_strings)
    data.similarity = similarity_adapter(_read_json(diff_dir / Files.SIMILARITY)
                                         or summary.get(Summary.SIMILARITY))
    data.lens = lens_adapter(_read_json(diff_dir / Files.LENS) or summary.get(Summary.LENS))
    if (diff_dir / Files.TOP_TOKENS).exists():
        data.top_tokens = top_tokens_adapter(_read_json(diff_dir / Files.TOP_TOKENS))
    if (diff_dir / Files.ACT_HISTS).exists():
        data.act_hists = {int(k): (v[0], v[1]) for k, v in
                          _read_json(diff_dir / Files.ACT_HISTS).items()}

    run = Path(run_dir) if run_dir is not None else find_run_dir(diff_dir, summary)
    if run is not None:
        if not run.is_dir():
            raise CrosscodersError(
                f"run directory {run} does not exist; check --run, or leave it out (the diff "
                "directory usually records it)"
            )
        data.metrics = read_metrics(run / "metrics.jsonl")
        data.config = _read_json(run / "run.json") or _read_json(run / "config.json") or {}
    data.title = title or _default_title(diff_dir, run)
    return data


def find_run_dir(diff_dir: Path, summary: Mapping[str, Any]) -> Path | None:
    """The training run that produced ``diff_dir``: the one the summary records
    (``run_dir``), the diff dir itself, or its parent (``runs/cc/diff``) -- whichever holds
    ``metrics.jsonl``."""
    recorded = summary.get(Summary.RUN_DIR)
    candidates = [Path(recorded)] if isinstance(recorded, str) else []
    candidates += [diff_dir, diff_dir.parent]
    for c in candidates:
        if (c / "metrics.jsonl").exists():
            return c
    return None


def read_metrics(path: Path) -> list[dict]:
    """Trainer records from ``metrics.jsonl``; unreadable lines (a killed write) skipped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            records.append(rec)
    return records


# ------------------------------------------------------------------ examples
def example_from_stored(ids: Iterable | None, text: list | None, acts: list | None,
             token_strings: Callable | None, label: str | None) -> Example | None:
    """One example from ids / text / acts as the diff step stores them.

    ``text`` holds strings only for the non-negative ids (negative ids: positions outside
    the stored data), so it is re-aligned here and those positions dropped.
    """
    ids = [int(i) for i in ids] if ids is not None else None
    if ids is None:
        if text is None or acts is None:
            return None
        ids = list(range(len(text)))
        token_strs = list(text)
    else:
        keep = [i for i in ids if i >= 0]
        if text is not None and len(text) == len(keep):
            token_strs = list(text)
        elif token_strings is not None:
            token_strs = list(token_strings(keep))
        else:
            token_strs = [f"⟨{i}⟩" for i in keep]
    acts = list(acts) if acts is not None else [0.0] * len(ids)
    if len(acts) != len(ids):
        return None
    if len(token_strs) != len(ids):  # drop the positions with negative ids
        acts = [a for i, a in zip(ids, acts) if i >= 0]
    vals = [float(a) if a is not None else 0.0 for a in acts]
    return Example(token_strs, vals, label)


def _label(kind: str | None, quantile: float | None) -> str | None:
    if kind == "sample" and quantile is not None and np.isfinite(quantile):
        return f"random firing · q{quantile:.2f}"
    return kind if kind and kind != "top" else None


def examples_from_sqlite(
    path: str | Path, max_examples: int = 20, token_strings: Callable | None = None
) -> dict[int, list[Example]]:
    """Examples from ``diff.examples.save_examples``' SQLite file: top ones first (by
    rank), then the random firings from strongest to weakest; at most ``max_examples``."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT latent, kind, quantile, tokens, acts, text FROM examples "
            "ORDER BY latent, kind = 'sample', rank"
        ).fetchall()
    except sqlite3.DatabaseError as err:
        raise unreadable(path, "an examples database", err, RERUN_FIX) from None
    finally:
        con.close()
    out: dict[int, list[Example]] = {}
    for latent, kind, quantile, tokens, acts, text in rows:
        bucket = out.setdefault(int(latent), [])
        if len(bucket) >= max_examples:
            continue
        ex = example_from_stored(_loads(tokens), _loads(text), _loads(acts), token_strings,
                      _label(kind, quantile))
        if ex is not None:
            bucket.append(ex)
    return out


def examples_from_frame(
    df: Any, max_examples: int = 20, token_strings: Callable | None = None
) -> dict[int, list[Example]]:
    """Examples from a table with ``latent`` and ``acts`` plus ``tokens`` (ids) and/or
    ``text`` (strings), optionally ``kind``, ``rank``, ``quantile``."""
    if "latent" not in df.columns or "acts" not in df.columns:
        raise CrosscodersError(
            f"an examples table needs 'latent' and 'acts' columns, got {list(df.columns)}"
        )
    if "rank" in df.columns:
        order = ["latent"] + (["kind"] if "kind" in df.columns else []) + ["rank"]
        df = df.sort_values(order, ascending=[True] + [False] * (len(order) - 2) + [True])
    out: dict[int, list[Example]] = {}
    for rec in df.to_dict("records"):
        bucket = out.setdefault(int(rec["latent"]), [])
        if len(bucket) >= max_examples:
            continue
        ex = example_from_stored(_listish(rec.get("tokens")), _listish(rec.get("text")),
                      _listish(rec.get("acts")), token_strings,
                      _label(rec.get("kind"), rec.get("quantile")))
        if ex is not None:
            bucket.append(ex)
    return out


def _loads(text: str | None) -> Any:
    return json.loads(text) if text is not None else None


def _listish(value: Any) -> list | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, str):
        return json.loads(value)
    return list(value)


# ------------------------------------------------------------------ baselines
def similarity_adapter(obj: Any) -> dict:
    """CKA / SVCCA results as ``{metric: value}`` or ``{metric: {pair: value}}``.

    Reads ``similarity.json`` (matrices ``[[...]]`` whose axes ``rows`` / ``cols`` name)
    or the summary's copy (matrices alone); scalars and ``{pair: value}`` dicts pass as is.
    """
    if not isinstance(obj, Mapping):
        return {}
    rows = obj.get(Similarity.ROWS)
    cols = obj.get(Similarity.COLS)
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if key in (Similarity.ROWS, Similarity.COLS):
            continue
        arr = np.asarray(value, dtype=object) if isinstance(value, list) else None
        if arr is not None and arr.ndim == 2:
            named = {}
            for i, row in enumerate(value):
                for j, v in enumerate(row):
                    r = rows[i] if isinstance(rows, list) and i < len(rows) else f"base {i}"
                    c = cols[j] if isinstance(cols, list) and j < len(cols) else f"chat {j}"
                    named[f"{r} / {c}"] = v
            out[key] = named if len(named) > 1 else next(iter(named.values()))
        elif isinstance(value, (int, float, Mapping)) and not isinstance(value, bool):
            out[key] = value
    return out


def lens_adapter(obj: Any) -> list[dict]:
    """The activation-difference lens (``lens.json``, or the summary's copy) as the one
    entry ``{position, promoted, suppressed, norm}`` of ``ReportData.lens``: the lens reads
    the mean difference over the first tokens."""
    if not isinstance(obj, Mapping):
        return []
    rec: dict[str, Any] = {"position": "mean of the first tokens"}
    for key in (Lens.PROMOTED, Lens.SUPPRESSED):
        if obj.get(key) is not None:
            rec[key] = _pairs(obj[key])
    norm = obj.get(Lens.NORM)
    if isinstance(norm, (int, float)):
        rec["norm"] = norm
    return [rec] if len(rec) > 1 else []


def top_tokens_adapter(obj: Any) -> dict[int, dict[str, list[tuple[str, float]]]]:
    """``{latent: {model: [[token, value], ...]}}`` (keys may be strings) -> typed dict."""
    if not isinstance(obj, Mapping):
        return {}
    return {int(k): {str(m): _pairs(p) for m, p in v.items()} for k, v in obj.items()
            if isinstance(v, Mapping)}


def _pairs(value: Any) -> list[tuple[str, float]]:
    """Token scores from ``[[tok, v], ...]`` (top tokens) or ``[{"token": t, "logit": v},
    ...]`` (the lens)."""
    out = []
    for p in value:
        if isinstance(p, Mapping):
            out.append((str(p[Lens.TOKEN]), float(p[Lens.LOGIT])))
        else:
            out.append((str(p[0]), float(p[1])))
    return out


# ------------------------------------------------------------------ helpers
def _first(directory: Path, names: Iterable[str]) -> Path | None:
    return next((directory / n for n in names if (directory / n).exists()), None)


def _read_json(path: Path | None) -> Any:
    if path is None or not path.exists():
        return None
    return read_json(path, "re-run the step that wrote it")


def _default_title(diff_dir: Path, run: Path | None) -> str:
    name = (run or diff_dir).resolve().name
    return f"Crosscoder report · {name}"
