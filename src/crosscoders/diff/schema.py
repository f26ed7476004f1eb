"""What ``crosscoders diff`` writes and its readers rely on: the latent table's columns, the
files of a diff directory and the keys of its JSON documents.

The writer (``diff/table.py``, ``diff/graded.py``, ``diff/run.py``) and the reader
(``report/load.py``, ``report/render.py``) both name these through this module, so a column
or key renamed here is renamed on both sides, and a test compares what ``diff`` writes
with :data:`COLUMNS`. Readers take exactly these names: no aliases.

The table says ``base`` and ``chat`` whatever the sources are called (their names are in
``summary.json`` under :attr:`Summary.SOURCES`), so notebooks can rely on the names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from crosscoders.errors import CrosscodersError, DataError
from crosscoders.io import read_table

#: which run of ``diff`` writes a column (:attr:`Column.when`)
ALWAYS = "always"  # from the weights alone
GRADED = "graded"  # with the graded view (DiffConfig.graded, the default)
DATA = "data"  # with activations (every run but --weights-only)
LATENT_SCALING = "latent_scaling"  # with Latent Scaling (latent_scaling != "none")
LATENT_SCALING_GRADED = "latent_scaling+graded"  # with both


@dataclasses.dataclass(frozen=True)
class Column:
    """One column of the latent table."""

    name: str
    dtype: str  # int | float | bool | str
    when: str  # ALWAYS, GRADED, DATA, LATENT_SCALING or LATENT_SCALING_GRADED
    meaning: str


#: every column ``diff`` writes, by name, in the table's order
COLUMNS: dict[str, Column] = {}


def _column(name: str, dtype: str, when: str, meaning: str) -> str:
    COLUMNS[name] = Column(name, dtype, when, meaning)
    return name


# Norms are in the normalised units the crosscoder was trained in (Crosscoder.decoder_norms).
LATENT = _column("latent", "int", ALWAYS, "the latent's index, 0 .. dict_size - 1")
NORM_BASE = _column("norm_base", "float", ALWAYS, "decoder norm for the base source")
NORM_CHAT = _column("norm_chat", "float", ALWAYS, "decoder norm for the chat source")
REL_NORM = _column("rel_norm", "float", ALWAYS,
                   "n_chat / (n_base + n_chat): 0 base-only, 0.5 shared, 1 chat-only")
DNORM = _column("dnorm", "float", ALWAYS,
                "Minder's 0.5 * (1 + (n_chat - n_base) / max(n_base, n_chat)): 1 chat-only")
CATEGORY = _column("category", "str", ALWAYS,
                   "the label: the preset's, refined by the graded view (leaning, dead, rare)")
COS = _column("cos", "float", ALWAYS, "dec_cos again, under the short name notebooks use")
DEC_COS = _column("dec_cos", "float", ALWAYS, "cosine of the base and chat decoder vectors")
ENC_COS = _column("enc_cos", "float", ALWAYS, "cosine of the base and chat encoder vectors")
N_FIRES = _column("n_fires", "int", DATA, "analysed tokens on which the latent fired")
FREQ = _column("freq", "float", DATA, "n_fires / analysed tokens")
MEAN_ACT = _column("mean_act", "float", DATA, "mean activation over the firing tokens")
MAX_ACT = _column("max_act", "float", DATA, "largest activation")
SPECIAL_SHARE = _column("special_share", "float", DATA,
                        "share of the firings on special tokens (NaN without token ids)")
PRESET_CATEGORY = _column("preset_category", "str", GRADED, "the preset's label alone")
REL_NORM_Z = _column("rel_norm_z", "float", GRADED,
                     "null SDs of log(n_chat / n_base) from the null centre (NaN: not tested)")
REL_NORM_P = _column("rel_norm_p", "float", GRADED, "two-sided p-value of rel_norm_z")
REL_NORM_Q = _column("rel_norm_q", "float", GRADED, "Benjamini-Hochberg q-value of rel_norm_p")
DIFF_SCORE = _column("diff_score", "float", GRADED,
                     "|rel_norm_z|, exclusive latents included; the report sorts by it")
BETA_BASE_RECON = _column("beta_base_recon", "float", LATENT_SCALING,
                          "Latent Scaling beta of the base reconstruction (NaN: not scaled)")
BETA_CHAT_RECON = _column("beta_chat_recon", "float", LATENT_SCALING,
                          "Latent Scaling beta of the chat reconstruction")
BETA_BASE_ERR = _column("beta_base_err", "float", LATENT_SCALING,
                        "Latent Scaling beta of the base reconstruction error")
BETA_CHAT_ERR = _column("beta_chat_err", "float", LATENT_SCALING,
                        "Latent Scaling beta of the chat reconstruction error")
NU_R = _column("nu_r", "float", LATENT_SCALING, "beta ratio of the reconstructions (decoupling)")
NU_EPS = _column("nu_eps", "float", LATENT_SCALING,
                 "beta ratio of the errors (complete shrinkage)")
LS_REF = _column("ls_ref", "str", LATENT_SCALING,
                 "the reference source of Latent Scaling: chat, base, or empty (not scaled)")
TRULY_EXCLUSIVE = _column("truly_exclusive", "bool", LATENT_SCALING,
                          "nu_r and nu_eps below the rule (DiffConfig.rule)")
TRULY_CHAT_ONLY = _column("truly_chat_only", "bool", LATENT_SCALING,
                          "chat_only, referenced to chat and truly exclusive")
TRULY_BASE_ONLY = _column("truly_base_only", "bool", LATENT_SCALING,
                          "base_only, referenced to base and truly exclusive")
NU_R_Z = _column("nu_r_z", "float", LATENT_SCALING_GRADED,
                 "robust z of nu_r against the shared control")
NU_EPS_Z = _column("nu_eps_z", "float", LATENT_SCALING_GRADED,
                   "robust z of nu_eps against the shared control")
LS_Q = _column("ls_q", "float", LATENT_SCALING_GRADED,
               "BH q-value of nu_eps lying below the shared control")

#: what a reader cannot do without: the report needs no other column
REQUIRED: tuple[str, ...] = (LATENT, CATEGORY)


def columns_written(*, graded: bool, data: bool, latent_scaling: bool) -> list[str]:
    """The columns a ``diff`` run writes, in the table's order."""
    on = {ALWAYS}
    on |= {GRADED} if graded else set()
    on |= {DATA} if data else set()
    on |= {LATENT_SCALING} if latent_scaling else set()
    on |= {LATENT_SCALING_GRADED} if latent_scaling and graded else set()
    return [c.name for c in COLUMNS.values() if c.when in on]


class Files:
    """The files of a diff directory."""

    LATENTS_PARQUET = "latents.parquet"  # the latent table (read first)
    LATENTS_CSV = "latents.csv"  # the same table as CSV
    SUMMARY = "summary.json"  # keys: Summary
    EXAMPLES = "examples.db"  # SQLite, diff.examples.save_examples
    SIMILARITY = "similarity.json"  # keys: Similarity
    CAUSAL = "causal.json"  # with --models
    LENS = "lens.json"  # with --models; keys: Lens
    STEERING = "steering.json"  # with --steer-prompt
    DIFF_CONFIG = "diff_config.json"  # the DiffConfig used
    REPORT = "report.html"  # where `crosscoders report` writes by default
    # Not written by diff; the report reads them when the user adds them.
    EXAMPLES_PARQUET = "examples.parquet"  # examples from elsewhere, one row per example
    TOP_TOKENS = "top_tokens.json"  # report.decoder_top_tokens: {latent: {model: [[t, v]]}}
    ACT_HISTS = "act_hists.json"  # {latent: [bin_edges, counts]}


#: the latent table, in the order readers try them
LATENT_FILES: tuple[str, ...] = (Files.LATENTS_PARQUET, Files.LATENTS_CSV)
#: what ``LatentTable.save`` writes
TABLE_FILES: tuple[str, ...] = (*LATENT_FILES, Files.SUMMARY)
#: the fix for a damaged output of the diff step
RERUN_FIX = "the file is damaged: re-run `crosscoders diff` into a new directory"


class Summary:
    """Keys of ``summary.json`` that readers rely on (the report shows the rest as is)."""

    SOURCES = "sources"  # {"base": name, "chat": name, "base_index": i, "chat_index": j}
    PRESET = "preset"  # preset name, or "custom"
    THRESHOLDS = "thresholds"  # CategoryThresholds.to_dict(): convention and cut-offs
    N_LATENTS = "n_latents"
    COUNTS = "counts"  # {category: latents}
    PRESET_COUNTS = "preset_counts"  # {preset category: latents}
    ALIVE_COUNTS = "alive_counts"  # {category: latents that fired}, with data
    FVU = "fvu"  # {source name: fraction of variance unexplained}, with data
    L0 = "l0"  # mean active latents per token, with data
    DEAD_FRACTION = "dead_fraction"  # share of latents that never fired, with data
    GRADED = "graded"  # the graded view's null, band, fdr, counts (diff.graded.grade)
    LATENT_SCALING = "latent_scaling"  # rule {nu_r_max, nu_eps_max}, counts, medians
    DATA = "data"  # the store's description, or {"kind": "tensor"}
    EXAMPLES = "examples"  # {"file", "n", "n_latents", "collected_for"}
    SIMILARITY = "similarity"  # {"cka": matrix, "svcca": matrix}
    CAUSAL = "causal"  # as causal.json
    LENS = "lens"  # {"norm", "promoted"} of lens.json
    STEERING = "steering"  # {"file", "latents"}
    RUN_DIR = "run_dir"  # the crosscoder's (training run's) directory, when diff got one
    WEIGHTS_ONLY = "weights_only"  # true when diff read the weights alone (--weights-only)


class Similarity:
    """Keys of ``similarity.json``: each metric a [rows x cols] matrix over the sites."""

    ROWS = "rows"  # base-model sites
    COLS = "cols"  # chat-model sites
    CKA = "cka"
    SVCCA = "svcca"
    N_TOKENS = "n_tokens"


class Lens:
    """Keys of ``lens.json``: tokens as ``{"token_id", "token", "logit"}``, strongest first."""

    PROMOTED = "promoted"
    SUPPRESSED = "suppressed"
    NORM = "norm"  # norm of the mean activation difference
    N_POSITIONS = "n_positions"
    COUNT_PER_POSITION = "count_per_position"
    TOKEN = "token"
    LOGIT = "logit"


def check_columns(columns: Mapping[str, Any], where: str | Path) -> None:
    """Refuse a latent table (name -> column) without a :data:`REQUIRED` column."""
    for name in REQUIRED:
        if name not in columns:
            raise DataError(
                f"{where} has no {name!r} column (it has: {', '.join(map(str, columns)) or 'none'}"
                "); pass the output directory of `crosscoders diff`, or re-run it"
            )


def check_table(df: Any, path: str | Path) -> None:
    """Refuse a latent table read from ``path`` that lacks a :data:`REQUIRED` column or holds
    text in a column that ``diff`` writes as numbers."""
    from pandas.api.types import is_numeric_dtype

    check_columns({str(c): None for c in df.columns}, path)
    for name in df.columns:
        spec = COLUMNS.get(str(name))
        if spec is not None and spec.dtype != "str" and not is_numeric_dtype(df[name]):
            raise DataError(
                f"column {name!r} of {path} holds {df[name].dtype} values, not {spec.dtype}; "
                f"{RERUN_FIX}"
            )


def read_latent_table(diff_dir: str | Path) -> Any:
    """The latent table of ``diff_dir`` as a DataFrame (Parquet preferred, CSV otherwise),
    checked with :func:`check_table`."""
    diff_dir = Path(diff_dir)
    found = next((diff_dir / n for n in LATENT_FILES if (diff_dir / n).exists()), None)
    if found is None:
        raise CrosscodersError(
            f"{diff_dir} has no latent table ({' or '.join(LATENT_FILES)}); run "
            "`crosscoders diff` first or pass its output directory"
        )
    df = read_table(found, RERUN_FIX)
    check_table(df, found)
    return df
