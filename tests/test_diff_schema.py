"""The contract between ``crosscoders diff`` and the report (``crosscoders.diff.schema``):
what diff writes is what the schema names, and the report reads it back through the same
names; a table that breaks the contract is refused with the fix."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from crosscoders import Crosscoder, CrosscoderConfig
from crosscoders.diff import schema
from crosscoders.diff.graded import GradedConfig
from crosscoders.diff.run import DiffConfig, run_diff
from crosscoders.diff.schema import COLUMNS, Files, Similarity, Summary, columns_written
from crosscoders.diff.table import latent_table
from crosscoders.errors import DataError
from crosscoders.report import build_report, load_report_data
from crosscoders.report.render import PLOT_COLUMNS, build_payload

pd = pytest.importorskip("pandas")

_KINDS = {"int": "iu", "float": "f", "bool": "b"}


def _crosscoder(seed: int = 0) -> Crosscoder:
    torch.manual_seed(seed)
    return Crosscoder(CrosscoderConfig(n_sources=2, d_model=8, dict_size=48,
                                       activation="batchtopk", k=4))


@pytest.fixture(scope="module")
def diff_dir(tmp_path_factory):
    """A full diff (data, graded view, Latent Scaling of every latent) of a saved
    crosscoder, written away from its run directory."""
    root = tmp_path_factory.mktemp("schema")
    run = _crosscoder().save(root / "run")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "split": "train",
                                                   "loss": 0.5}) + "\n")
    x = torch.randn(600, 2, 8, generator=torch.Generator().manual_seed(1))
    cfg = DiffConfig(latent_scaling="all", progress=False, similarity_tokens=600,
                     batch_size=256)
    run_diff(run, x, root / "elsewhere" / "diff", cfg)
    return root / "elsewhere" / "diff", run


def test_diff_writes_every_schema_column_with_its_dtype(diff_dir):
    out, _ = diff_dir
    df = pd.read_parquet(out / Files.LATENTS_PARQUET)
    assert list(df.columns) == list(COLUMNS)  # every column, in the schema's order
    for name, col in COLUMNS.items():
        if col.dtype == "str":
            assert df[name].map(type).eq(str).all(), name
        else:
            assert df[name].dtype.kind in _KINDS[col.dtype], (name, df[name].dtype)
    csv = pd.read_csv(out / Files.LATENTS_CSV)
    assert list(csv.columns) == list(COLUMNS)
    np.testing.assert_allclose(csv[schema.REL_NORM], df[schema.REL_NORM])


def test_report_reads_back_what_diff_wrote(diff_dir):
    out, run = diff_dir
    for name in (Files.SUMMARY, Files.SIMILARITY, Files.EXAMPLES, Files.DIFF_CONFIG):
        assert (out / name).is_file(), name
    data = load_report_data(out)
    assert list(data.latents.columns) == list(COLUMNS)
    written = pd.read_parquet(out / Files.LATENTS_PARQUET)
    for name in COLUMNS:
        np.testing.assert_array_equal(data.latents[name].to_numpy(), written[name].to_numpy())

    summary = json.loads((out / Files.SUMMARY).read_text())
    for key in (Summary.SOURCES, Summary.PRESET, Summary.THRESHOLDS, Summary.COUNTS,
                Summary.GRADED, Summary.LATENT_SCALING, Summary.EXAMPLES,
                Summary.SIMILARITY):
        assert key in summary, key
    assert data.summary == summary
    # the recorded run directory is how the report finds the training curves
    assert summary[Summary.RUN_DIR] == str(run.resolve())
    assert [m["loss"] for m in data.metrics] == [0.5]
    # similarity.json: one site per model, so a scalar per metric
    sim = json.loads((out / Files.SIMILARITY).read_text())
    assert data.similarity == {Similarity.CKA: sim[Similarity.CKA][0][0],
                               Similarity.SVCCA: sim[Similarity.SVCCA][0][0],
                               Similarity.N_TOKENS: 600}

    payload, _ = build_payload(data)
    assert payload["roles"] == PLOT_COLUMNS  # every column the plots draw is there
    assert [c["name"] for c in payload["table"]["columns"]][:3] == [
        schema.LATENT, schema.CATEGORY, schema.DIFF_SCORE]
    assert build_report(out).is_file()


@pytest.mark.parametrize("graded", [True, False])
def test_weights_only_and_ungraded_tables_match_the_schema(graded):
    model = _crosscoder()
    cfg = GradedConfig() if graded else None
    table = latent_table(model, None, graded=cfg)
    assert list(table.df.columns) == columns_written(graded=graded, data=False,
                                                     latent_scaling=False)
    x = torch.randn(300, 2, 8, generator=torch.Generator().manual_seed(2))
    table = latent_table(model, x, latent_scaling="none", progress=False, graded=cfg)
    assert list(table.df.columns) == columns_written(graded=graded, data=True,
                                                     latent_scaling=False)


def test_a_table_without_a_required_column_names_it_and_the_fix(diff_dir, tmp_path):
    out, _ = diff_dir
    df = pd.read_parquet(out / Files.LATENTS_PARQUET).drop(columns=[schema.CATEGORY])
    df.to_parquet(tmp_path / Files.LATENTS_PARQUET, index=False)
    with pytest.raises(DataError) as err:
        load_report_data(tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert f"{tmp_path / Files.LATENTS_PARQUET} has no 'category' column" in message
    assert "re-run it" in message and "crosscoders diff" in message


def test_a_table_with_text_in_a_numeric_column_is_refused(diff_dir, tmp_path):
    out, _ = diff_dir
    df = pd.read_parquet(out / Files.LATENTS_PARQUET)
    df[schema.REL_NORM] = "oops"
    df.to_csv(tmp_path / Files.LATENTS_CSV, index=False)
    with pytest.raises(DataError, match=r"column 'rel_norm' of .*latents\.csv holds .* not "
                                        r"float; .* re-run `crosscoders diff`"):
        load_report_data(tmp_path)


def test_columns_written_partitions_the_schema():
    full = columns_written(graded=True, data=True, latent_scaling=True)
    assert full == list(COLUMNS)
    assert set(schema.REQUIRED) <= set(columns_written(graded=False, data=False,
                                                       latent_scaling=False))
    assert {c.dtype for c in COLUMNS.values()} <= {"int", "float", "bool", "str"}
