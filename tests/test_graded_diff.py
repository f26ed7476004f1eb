"""The graded diff: the empirical null, Benjamini-Hochberg, the leaning / dead / rare
categories, and ground truth on a crosscoder trained on planted features whose strength
changes by 20-70% between the models."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
import torch

from crosscoders import CrosscoderConfig, TrainConfig, train
from crosscoders.bench.diffing import graded_scores
from crosscoders.bench.planted import PlantedConfig, make_planted_data
from crosscoders.bench.synthetic import match_latents
from crosscoders.data import TensorSource
from crosscoders.diff.graded import (
    GRADED_CATEGORIES,
    GradedConfig,
    bh_qvalues,
    fit_null,
    grade,
    leaning_candidates,
)
from crosscoders.diff.run import DiffConfig, run_diff
from crosscoders.diff.table import latent_table, normalised_decoder
from crosscoders.errors import ConfigError

pd = pytest.importorskip("pandas")

FDR = 0.05


# ------------------------------------------------------------------ the null and BH
def test_fit_null_ignores_the_changed_tails():
    rng = np.random.default_rng(0)
    null = rng.normal(0.02, 0.05, 800)
    changed = rng.choice([-1, 1], 200) * rng.uniform(0.4, 1.0, 200)
    fit = fit_null(np.concatenate([null, changed]))
    assert fit.center == pytest.approx(0.02, abs=0.008)
    assert fit.floor == pytest.approx(0.05, rel=0.12)
    assert fit.per_firing == 0.0 and fit.n == 1000 and fit.n_core < 850


def test_fit_null_learns_the_firing_dependence():
    rng = np.random.default_rng(1)
    fires = np.exp(rng.uniform(np.log(10), np.log(20000), 3000))
    t = rng.normal(0.0, np.sqrt(0.01**2 + 0.6**2 / fires))
    fit = fit_null(t, fires)
    assert fit.floor == pytest.approx(0.01, rel=0.2)
    assert fit.per_firing == pytest.approx(0.6, rel=0.1)
    assert fit.scale(100) == pytest.approx(np.sqrt(fit.floor**2 + fit.per_firing**2 / 100))
    with pytest.raises(ConfigError, match="at least 3"):
        fit_null(np.array([0.1, np.nan]))


def test_bh_qvalues_follow_the_step_up_definition():
    rng = np.random.default_rng(2)
    p = np.concatenate([rng.uniform(0, 1, 60), rng.uniform(0, 0.002, 15), [np.nan]])
    q = bh_qvalues(p)
    assert np.isnan(q[-1])
    p, q = p[:-1], q[:-1]
    m = len(p)
    order = np.sort(p)
    for alpha in (0.01, 0.05, 0.2):
        passing = np.flatnonzero(order <= alpha * np.arange(1, m + 1) / m)
        k = passing.max() + 1 if passing.size else 0  # BH rejects the k smallest
        assert (q <= alpha).sum() == k
    for i in range(m):  # q_i = min over p_j >= p_i of m p_j / rank_j
        ranks = np.argsort(np.argsort(p)) + 1
        assert q[i] == pytest.approx(min(1.0, np.min((m * p / ranks)[p >= p[i]])))


def _columns(t: np.ndarray, cos: np.ndarray | None = None,
             preset: np.ndarray | None = None) -> dict[str, np.ndarray]:
    F_ = len(t)
    return {"norm_base": np.exp(-t / 2), "norm_chat": np.exp(t / 2),
            "category": preset if preset is not None else np.full(F_, "shared"),
            "dec_cos": cos if cos is not None else np.ones(F_)}


def test_leaning_calls_keep_the_false_discovery_rate():
    """Simulated latents (null spread growing as firings drop, 10% changed by 20-70%): over
    repeated draws the share of false leaning calls stays below the FDR and the changed
    latents are found; with no change at all, almost no draw flags anything."""
    rng = np.random.default_rng(3)
    cfg = GradedConfig(fdr=FDR, min_change=0.0)  # the statistics alone
    fdp, power, any_null_flag = [], [], 0
    for _ in range(100):
        F_ = 400
        fires = np.exp(rng.uniform(np.log(20), np.log(5000), F_)).astype(int)
        t = rng.normal(0.0, np.sqrt(0.01**2 + 0.3**2 / fires))
        changed = np.arange(F_) < 40
        t[changed] += rng.choice([-1, 1], 40) * np.log1p(rng.uniform(0.2, 0.7, 40))
        cols, _ = grade(_columns(t), fires, cfg)
        flagged = np.isin(cols["category"], ("chat_leaning", "base_leaning"))
        fdp.append((flagged & ~changed).sum() / max(1, flagged.sum()))
        power.append((flagged & changed).sum() / 40)
        null_only, _ = grade(_columns(t[~changed]), fires[~changed], cfg)
        any_null_flag += int((null_only["category"] != "shared").any())
    assert np.mean(fdp) <= FDR
    assert np.mean(power) > 0.9
    assert any_null_flag / 100 <= 0.1  # BH on pure nulls: P(any call) <= FDR, up to noise


def test_grade_counts_dead_and_rare_apart_and_never_touches_exclusive_labels():
    rng = np.random.default_rng(4)
    F_ = 60
    t = rng.normal(0, 0.01, F_)
    t[:3], t[3:5] = 0.4, -0.5  # clearly changed
    t[5], t[6] = 6.0, -6.0  # exclusive
    preset = np.full(F_, "shared", dtype=object)
    preset[5], preset[6] = "chat_only", "base_only"
    preset[7] = "other"
    fires = np.full(F_, 500)
    fires[[8, 9, 5]] = 0  # dead (latent 5 is exclusive and keeps its label)
    fires[[10, 11, 12]] = [1, 5, 9]  # rare
    t[[8, 10]] = 0.9  # an untrained latent's ratio says nothing: never leaning
    cols, summary = grade(_columns(t, preset=preset.astype(str)), fires, GradedConfig())
    cat = cols["category"]
    assert list(cat[:5]) == ["chat_leaning"] * 3 + ["base_leaning"] * 2
    assert (cat[5], cat[6]) == ("chat_only", "base_only")
    assert list(cat[[8, 9]]) == ["dead"] * 2 and list(cat[[10, 11, 12]]) == ["rare"] * 3
    assert set(cat[13:]) == {"shared"} and cat[7] == "other"
    assert list(cols["preset_category"]) == list(preset)
    assert np.isnan(cols["diff_score"][[8, 9, 10, 11, 12]]).all()
    assert np.isfinite(cols["diff_score"][[0, 5, 6, 13]]).all()
    assert cols["diff_score"][5] > cols["diff_score"][0] > cols["diff_score"][13]
    assert np.isnan(cols["rel_norm_q"][[5, 6, 8]]).all()  # only tested latents get a q
    assert summary["n_dead"] == 2 and summary["n_rare"] == 3
    assert summary["n_tested"] == F_ - 2 - 2 - 3  # not exclusive, fired >= 10 times
    assert summary["top_chat_leaning"][0] in (0, 1, 2)
    lo, hi = summary["band"]
    assert lo < 0.5 < hi and hi - lo < 0.1


def test_weights_only_tests_latents_whose_directions_agree():
    rng = np.random.default_rng(5)
    F_ = 80
    t = rng.normal(0, 0.01, F_)
    t[:4] = 0.5
    cos = np.full(F_, 0.95)
    cos[4:24] = rng.uniform(-0.2, 0.2, 20)  # untrained: random directions per source
    t[4:24] = 0.7  # e.g. a different initial scale per source: must not read as leaning
    cols, summary = grade(_columns(t, cos), None, GradedConfig())
    assert set(cols["category"][:4]) == {"chat_leaning"}
    assert set(cols["category"][4:]) == {"shared"}
    assert summary["n_tested"] == F_ - 20 and summary["min_fires"] is None
    few, summary = grade(_columns(t[:10]), None, GradedConfig())
    assert set(few["category"]) == {"shared"} and "no null fitted" in summary["note"]
    with pytest.raises(ConfigError, match="fdr"):
        GradedConfig(fdr=0.0)


def test_designated_latents_are_never_tested():
    """Tied shared latents sit at rel_norm 0.5 exactly by design, and exclusive ones at 0
    or 1: a spike the null must not be fitted to, and nothing to test."""
    from crosscoders import Crosscoder
    from crosscoders.diff.table import designated_latents

    cfg = CrosscoderConfig(n_sources=2, d_model=16, dict_size=64, activation="batchtopk", k=4,
                           n_shared_latents=8, n_exclusive_latents=[2, 3],
                           source_names=["base", "chat"])
    model = Crosscoder(cfg)
    fixed = designated_latents(model, 0, 1)
    assert fixed[:13].all() and not fixed[13:].any()
    with torch.no_grad():  # make every decoder "trained" (directions agree across sources)
        model.W_dec[13:, 1] = model.W_dec[13:, 0] * (1 + 0.01 * torch.randn(51, 1))
    df = latent_table(model).df
    assert df["rel_norm_q"][:13].isna().all() and df["rel_norm_q"][13:].notna().all()
    assert set(df["category"][:8]) == {"shared"}
    assert set(df["category"][8:10]) == {"base_only"} and set(df["category"][10:13]) == {
        "chat_only"}


# ------------------------------------------------------------------ ground truth
PLANTED = PlantedConfig(d_model=32, n_shared=28, n_shared_rotated=0, n_shared_weaker=0,
                        n_base_only=2, n_chat_only=2, n_shared_shifted=12, n_tokens=16384,
                        fire_prob=0.05, seed=1)


@pytest.fixture(scope="module")
def trained():
    data = make_planted_data(PLANTED)
    cfg = CrosscoderConfig(n_sources=2, d_model=32, dict_size=64, activation="batchtopk", k=4,
                           source_names=["base", "chat"], seed=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is faster on a shared CPU
    try:
        model = train(cfg, data.acts_NSD, TrainConfig(steps=600, batch_size=512, lr=3e-3, seed=1,
                                                      progress=False, eval_tokens=0)).eval()
    finally:
        torch.set_num_threads(threads)
    return model, data


def test_planted_strength_changes_come_out_leaning_the_right_way(trained):
    model, data = trained
    table = latent_table(model, data.acts_NSD, progress=False)
    df = table.df
    match = match_latents(normalised_decoder(model), data.directions_PSD, threshold=0.9)
    alive = df["n_fires"].to_numpy() > 0
    score = graded_scores(df["category"].to_numpy(), alive, data, match, FDR)
    shifted = score.changed["shared_shifted"]
    # features 20-70% stronger in one model: leaning towards that model
    assert shifted["n"] >= 8 and shifted["found"] == shifted["n"] and shifted["wrong"] == 0
    # unchanged shared features: flagged at a rate within the stated FDR
    assert score.n_unchanged >= 20
    assert score.unchanged_flag_rate <= FDR
    # exclusive ones stay exclusive; the graded view never relabels an exclusive latent
    assert score.n_exclusive >= 3 and score.n_exclusive_kept == score.n_exclusive
    excl = df["preset_category"].isin(["chat_only", "base_only"])
    assert (df.loc[excl, "category"] == df.loc[excl, "preset_category"]).all()
    # the leaning calls are mostly right (false: nearest planted feature unchanged)
    assert score.n_false <= max(1, FDR * score.n_discoveries)

    # dead and rare latents are counted apart, never as shared
    counts = table.summary["counts"]
    assert set(counts) == set(GRADED_CATEGORIES) and sum(counts.values()) == len(df)
    fires = df["n_fires"].to_numpy()
    not_excl = ~excl.to_numpy()
    assert counts["dead"] == int((not_excl & (fires == 0)).sum())
    assert counts["rare"] == int((not_excl & (fires > 0) & (fires < 10)).sum())
    assert counts["chat_leaning"] >= 5 and counts["base_leaning"] >= 5
    assert table.summary["preset_counts"]["shared"] > counts["shared"]
    graded = table.summary["graded"]
    assert graded["n_chat_leaning"] == counts["chat_leaning"] and graded["fdr"] == FDR
    assert 0.4 < graded["band"][0] < 0.5 < graded["band"][1] < 0.6

    # Latent Scaling ratios against the shared control confirm the leaning latents: the
    # weaker model's activation carries less of the latent's direction
    ls = table.summary["latent_scaling"]["null"]
    assert ls["n_control"] >= 10
    for side in ("chat_leaning", "base_leaning"):
        rows = df[df["category"] == side]
        assert (rows["ls_ref"] == side[:4]).all()  # referenced to the stronger model
        assert ls[f"n_{side}_confirmed"] >= 0.8 * len(rows)
        assert (rows["nu_eps"] < 1).all()


def test_run_diff_collects_examples_and_reports_the_graded_view(trained, tmp_path, capsys):
    from crosscoders.cli import main as cli_main
    from crosscoders.pipeline.run import PipelineResult
    from crosscoders.pipeline.summary import format_summary, top_leaning
    from crosscoders.report import build_report

    model, data = trained
    # token id = the planted feature firing most strongly on the row
    token_ids = data.codes_NP.argmax(dim=1).numpy()
    rows = TensorSource(data.acts_NSD, token_ids=token_ids)
    out = tmp_path / "exp" / "diff"
    summary = run_diff(model, rows, out, DiffConfig(progress=False, n_top=5, n_samples=3))
    counts = summary["counts"]
    assert counts["chat_leaning"] >= 5 and summary["graded"]["n_tested"] > 30
    df = pd.read_parquet(out / "latents.parquet")

    # examples: every leaning latent among the candidates has contexts; no shared one does
    con = sqlite3.connect(out / "examples.db")
    with_examples = {r[0] for r in con.execute("SELECT DISTINCT latent FROM examples")}
    con.close()
    leaning = set(df.loc[df["category"].isin(["chat_leaning", "base_leaning"]), "latent"])
    candidates = set(np.concatenate(leaning_candidates(
        {k: df[k].to_numpy() for k in ("norm_base", "norm_chat", "dec_cos")}
        | {"category": df["preset_category"].to_numpy()})).tolist())
    assert leaning & candidates and leaning & candidates <= with_examples
    shared = set(df.loc[df["category"] == "shared", "latent"])
    assert not with_examples & shared
    assert summary["examples"]["n_latents"] == len(with_examples)

    # the terminal summary names the leaning latents with their tokens, and the tokens are
    # the planted features that are stronger on that side
    names = {i: f"f{i}" for i in range(len(data.kinds))}
    result = PipelineResult(out=tmp_path / "exp")
    text = format_summary(result, lambda ids: [names[i] for i in ids])
    assert "most chat-leaning latents" in text and "most base-leaning latents" in text
    assert f"{counts['chat_leaning']} chat-leaning" in text and "dead and" in text
    for side, stronger in (("chat", lambda r: r > 1), ("base", lambda r: r < 1)):
        top = top_leaning(out, lambda ids: [names[i] for i in ids], side, n=3)
        assert top and all(row["top_tokens"] for row in top)
        feature = int(top[0]["top_tokens"][0][1:])
        assert stronger(data.strength_ratio[feature]), (side, top[0])

    # the report: leaning categories, the null band, the browser's sort column
    report = build_report(out, out=tmp_path / "report.html")
    html = report.read_text()
    payload = json.loads(html.split('id="report-data">', 1)[1].split("</script>", 1)[0])
    assert {"chat_leaning", "base_leaning"} <= set(payload["categories"])
    assert payload["categories"].index("base_leaning") < payload["categories"].index("shared")
    assert payload["roles"]["diff_score"] == "diff_score"
    names_in_table = [c["name"] for c in payload["table"]["columns"]]
    assert names_in_table[:3] == ["latent", "category", "diff_score"]
    band = payload["summary"]["graded"]["band"]
    assert len(band) == 2 and band[0] < 0.5 < band[1]

    # `crosscoders diff --weights-only` prints the graded counts too
    model.save(tmp_path / "run")
    assert cli_main(["diff", str(tmp_path / "run"), "--weights-only", "--out",
                     str(tmp_path / "w")]) == 0
    printed = capsys.readouterr().out
    assert "chat_leaning" in printed and "base_leaning" in printed
