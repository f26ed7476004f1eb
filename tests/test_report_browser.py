"""The report in a real headless browser (chromium driven by playwright-core from node).

Set-up: ``tests/browser/setup.sh`` (apt chromium, npm playwright-core). Skipped, with the
reason, when chromium, node or playwright-core is missing. Screenshots and the measured load
time go to pytest's tmp dir and, when set, to ``$CROSSCODERS_TEST_ARTIFACTS``.
"""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from crosscoders.report import render_layers_report, render_report
from crosscoders.testing import fake_layers_data, fake_report_data

HERE = Path(__file__).parent / "browser"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
N_LATENTS = 16384


def _missing() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed"
    if not Path(CHROMIUM).exists():
        return f"chromium not found at {CHROMIUM}"
    if not (HERE / "node_modules" / "playwright-core").is_dir():
        return "playwright-core is not installed in tests/browser"
    return None


pytestmark = pytest.mark.skipif(
    _missing() is not None, reason=f"{_missing()}; run tests/browser/setup.sh"
)


def _run_page(html: Path, out: Path, *args: str, env: dict | None = None,
              script: str = "check_report.mjs") -> dict:
    proc = subprocess.run(
        ["node", str(HERE / script), str(html), str(out), *args],
        cwd=HERE, capture_output=True, text=True, timeout=240,
        env={**os.environ, "CHROMIUM": CHROMIUM, **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _keep(paths: list[str], extra: dict) -> None:
    target = os.environ.get("CROSSCODERS_TEST_ARTIFACTS")
    if not target:
        return
    dest = Path(target) / "report"
    dest.mkdir(parents=True, exist_ok=True)
    for p in paths:
        shutil.copy(p, dest / Path(p).name)
    (dest / "browser_timing.json").write_text(json.dumps(extra, indent=2) + "\n")


@pytest.fixture(scope="module")
def big_report(tmp_path_factory):
    data = fake_report_data(n_latents=N_LATENTS, n_with_examples=2000, n_examples=20)
    path = render_report(data, tmp_path_factory.mktemp("report") / "report.html")
    return data, path


def test_report_in_headless_chromium(big_report, tmp_path):
    data, html = big_report
    target = 4321
    r = _run_page(html, tmp_path, "--interact", env={"SEARCH_ID": str(target)})
    timing = {"n_latents": N_LATENTS, "html_mb": round(html.stat().st_size / 1e6, 2),
              **r["timing"], "wall_load_ms": r["wallLoadMs"]}
    print(f"\nreport load, {N_LATENTS} latents: {json.dumps(timing)}")
    _keep(r["screenshots"], timing)

    # loads cleanly and offline
    assert r["pageErrors"] == [] and r["console"] == []
    assert r["network"] == []
    assert r["nav"] == ["Overview", "Training", "Diffing", "Baselines", "Features"]
    # plots render: every chart has a real size and marks in it
    labels = {s["label"] for s in r["svgs"]}
    assert {"Loss", "FVU per source", "L0", "Dead fraction", "relative norm",
            "decoder cosine", "latent scaling", "category counts"} <= labels
    for svg in r["svgs"]:
        assert svg["width"] > 100 and svg["height"] > 50 and svg["marks"] > 0, svg
    rel = next(s for s in r["svgs"] if s["label"] == "relative norm")
    assert rel["marks"] > 20  # bars stacked by category
    # the graded view: the null band is shaded, dead and rare latents are left out of the
    # category plots until asked for, and the browser opens sorted by the diffing score
    assert r["band"] == 1 and "null band" in r["legend"]
    # the summary read by the keys diff writes: thresholds drawn, their score named
    assert r["guides"] == 4 and "preset: anthropic, score: rel_norm" in r["countsNote"]
    assert "dead" not in r["legend"] and "rare" not in r["legend"]
    assert "dead and" in r["untrainedNote"] and "left out" in r["untrainedNote"]
    assert {"dead", "rare"} <= set(r["legendWithUntrained"])
    assert r["initialSort"] == "diff score ↓"
    scores = [v for v in r["initialScores"] if v is not None]
    assert len(scores) == 200 and scores == sorted(scores, reverse=True)
    # the table is virtual: a screenful of rows for 16k latents
    assert 10 < r["rowCount"] < 100
    assert r["status"] == f"{N_LATENTS:,} of {N_LATENTS:,} latents"

    # category filter
    cats = np.asarray(data.latents["category"])
    n_chat = int((cats == "chat_only").sum())
    assert r["chatOnly"]["status"] == f"{n_chat:,} of {N_LATENTS:,} latents"
    assert set(r["chatOnly"]["view"]["values"]["category"]) == {"chat_only"}
    assert r["chatOnly"]["visibleCategories"] == ["chat-only"]
    # sorting by rel_norm, descending
    assert len(r["sorted"]) == n_chat and r["sortedHeader"] == "rel norm ↓"
    assert r["sorted"] == sorted(r["sorted"], reverse=True)

    # the card of the first row: stats, examples with highlighted tokens, top tokens, histogram
    card = r["card"]
    assert card["title"] == f"Latent {card['firstId']}"
    assert card["hash"] == f"#latent={card['firstId']}"
    assert card["examples"] == 8 and card["peaks"] == 8
    assert 0 < card["highlighted"] < card["tokens"]
    assert card["topTokens"] == 20
    assert {"rel norm", "cos", "freq", "nu r", "nu eps"} <= set(card["stats"])
    assert card["histogram"]["width"] > 100

    # search: a latent id, a column filter, a word that matches nothing
    assert r["searchId"]["ids"] == [target]
    view = r["searchFilterCheck"]
    want = (np.asarray(data.latents["rel_norm"]) > 0.95) & (np.asarray(data.latents["freq"])
                                                             < 0.001)
    assert len(view["ids"]) == int(want.sum()) > 0
    assert min(view["values"]["rel_norm"]) > 0.95 and max(view["values"]["freq"]) < 0.001
    assert r["searchNone"]["ids"] == []
    # clicking the last relative-norm bar filters the browser to that range
    assert "rel norm in [" in r["rangeFilter"]
    # deep link opens the card
    assert r["deepLink"] == f"Latent {target}"
    for shot in r["screenshots"]:
        assert Path(shot).stat().st_size > 10_000


def test_report_without_optional_sections(tmp_path):
    """A latent table alone (no run, no examples, no baselines) still renders cleanly."""
    from crosscoders.report import ReportData

    rng = np.random.default_rng(0)
    n = 500
    data = ReportData(latents={
        "latent": np.arange(n), "category": rng.choice(["shared", "chat_only"], n),
        "rel_norm": rng.random(n), "dec_cos": rng.uniform(-1, 1, n)})
    html = render_report(data, tmp_path / "plain.html")
    r = _run_page(html, tmp_path)
    assert r["pageErrors"] == [] and r["console"] == [] and r["network"] == []
    assert r["nav"] == ["Overview", "Diffing", "Features"]
    assert {s["label"] for s in r["svgs"]} == {"relative norm", "decoder cosine",
                                               "category counts"}
    # a table from before the graded view: no band, no dead/rare note, unsorted browser
    assert r["band"] == 0 and r["untrainedNote"] is None and r["initialSort"] is None
    assert r["guides"] == 0 and r["countsNote"] == "labels from the latent table"


def test_layers_report_in_headless_chromium(tmp_path):
    """The layers report: heat map sorted by peak layer (and by span), a column click and a
    table row open a card whose layer profile matches the data, contexts per layer."""
    n_layers = 6
    data = fake_layers_data(n_latents=4096, n_layers=n_layers, n_with_examples=4096)
    html = render_layers_report(data, tmp_path / "layers.html")
    r = _run_page(html, tmp_path, script="check_layers_report.mjs")
    _keep(r["screenshots"], {"n_latents": 4096, "html_mb": round(html.stat().st_size / 1e6, 2)})
    assert r["pageErrors"] == [] and r["console"] == [] and r["network"] == []
    assert r["nav"] == ["Overview", "Layers", "Comparison", "Features"]
    labels = {s["label"] for s in r["svgs"]}
    assert {"fvu per layer", "persistence", "effective layers", "peak layer",
            "comparison"} <= labels
    for svg in r["svgs"]:
        assert svg["width"] > 100 and svg["height"] > 50 and svg["marks"] > 0, svg
    assert r["comparisonRows"] == 1 + len(data.comparison["matched"])

    cols = data.table
    counted = cols["first"] >= 0
    # the heat map: every counted latent a column, drawn (a coloured pixel mid-plot)
    assert r["canvas"]["width"] > 800 and r["canvas"]["height"] >= 8 * n_layers
    assert r["canvas"]["midPixel"][3] == 255 and sum(r["canvas"]["midPixel"][:3]) > 0
    for state in (r["heatInitial"], r["heatSpan"], r["heatPeak"]):
        assert sorted(state["ids"]) == np.flatnonzero(counted).tolist()
    # sorted by span (widest first, then by peak layer) ...
    assert r["heatSpan"]["sort"] == "span" and r["spanChipOn"]
    spans = r["heatSpan"]["spans"]
    assert spans == sorted(spans, reverse=True) and spans[0] > spans[-1]
    # ... and back by peak layer (then widest first): the order the page opened with
    assert r["heatPeak"]["sort"] == "peak" and r["heatPeak"]["ids"] == r["heatInitial"]["ids"]
    pairs = list(zip(r["heatPeak"]["peaks"], [-s for s in r["heatPeak"]["spans"]]))
    assert pairs == sorted(pairs) and r["heatPeak"]["peaks"][0] < r["heatPeak"]["peaks"][-1]
    # a click on a column opens the latent under the mouse: the one the tooltip names, at
    # the column aimed at (give or take the columns one pixel holds)
    hit = r["heatTip"].split("\n")[0]
    assert re.fullmatch(r"latent \d+", hit) and r["heatClick"]["title"] == f"L{hit[1:]}"
    ids, click = r["heatPeak"]["ids"], r["heatClick"]
    assert abs(ids.index(int(hit.split()[1])) - click["k"]) <= len(ids) / click["plotWidth"] + 1

    # the card of the first row (most frequent first): its profile is the data's
    card = r["card"]
    latent = card["firstId"]
    assert latent == int(np.argmax(cols["freq"])) and card["title"] == f"Latent {latent}"
    norms = np.array([cols[f"norm/{n}"][latent] for n in data.sources()])
    heights = np.array(card["barHeights"])
    assert len(heights) == n_layers and card["profile"]["width"] > 200
    np.testing.assert_allclose(heights / heights.max(), norms / norms.max(), atol=0.02)
    assert card["dimmed"] == (norms < data.summary["threshold"] * norms.max()).tolist()
    peak_name = data.sources()[int(cols["peak"][latent])]
    assert card["note"].startswith(f"peak {peak_name} · span {int(cols['span'][latent])}")
    assert card["examples"] == 8  # the first 8 of 10 top contexts; the rest on request
    assert card["groups"] == list(data.layer_examples[latent])
    assert card["groupOn"] == peak_name and card["groupExamples"] == 5
    if len(card["groups"]) > 1:
        assert card["groupAfterClick"] == card["groups"][-1]
