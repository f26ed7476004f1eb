"""The HTML report: payload, safety of the embedded data, loaders over the diff formats."""

import json
import re

import numpy as np
import pytest
import torch

from crosscoders.cli import main as cli_main
from crosscoders.errors import CrosscodersError
from crosscoders.report import (
    Example,
    ReportData,
    build_report,
    decoder_top_tokens,
    load_report_data,
    render_report,
)
from crosscoders.report.data import clean_json, round_sig
from crosscoders.report.load import examples_from_sqlite, lens_adapter, similarity_adapter
from crosscoders.testing import fake_report_data

pd = pytest.importorskip("pandas")


def _embedded(html: str) -> tuple[dict, dict[int, dict]]:
    """The main JSON payload and the per-chunk JSON of a rendered page."""
    main = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html,
                     re.S)
    chunks = {int(n): json.loads(body) for n, body in re.findall(
        r'<script type="application/json" id="chunk-(\d+)">(.*?)</script>', html, re.S)}
    return json.loads(main.group(1)), chunks


def _example_for(payload: dict, chunks: dict, latent: int) -> list:
    row = payload["table"]["values"]["latent"].index(latent)
    return chunks[row // payload["chunk_size"]][str(latent)]["ex"]


def test_render_embeds_table_examples_and_metrics(tmp_path):
    data = fake_report_data(n_latents=600, n_with_examples=40, n_examples=6, n_steps=1000)
    out = render_report(data, tmp_path / "r.html", chunk_size=64)
    html = out.read_text()
    payload, chunks = _embedded(html)

    assert payload["n_latents"] == 600
    values = payload["table"]["values"]
    assert values["latent"] == list(range(600))
    cats = np.asarray(data.latents["category"])
    assert values["category"] == cats.tolist()
    # floats keep 4 significant digits; NaN (no Latent Scaling) becomes null
    np.testing.assert_allclose(values["rel_norm"], data.latents["rel_norm"], rtol=1e-3)
    nan = np.isnan(data.latents["nu_r"])
    assert all(v is None for v, n in zip(values["nu_r"], nan) if n)
    kinds = {c["name"]: c["kind"] for c in payload["table"]["columns"]}
    assert kinds["truly_chat_only"] == "bool" and kinds["category"] == "cat"
    assert kinds["top_act_tokens"] == "text" and kinds["promotes"] == "text"
    assert payload["roles"]["n_base"] == "norm_base" and payload["roles"]["cos"] == "dec_cos"
    assert payload["categories"] == ["base_only", "base_leaning", "shared", "chat_leaning",
                                     "chat_only", "other", "rare", "dead"]
    # the browser opens sorted by the diffing score: it comes right after the category
    assert [c["name"] for c in payload["table"]["columns"]][:3] == ["latent", "category",
                                                                    "diff_score"]
    assert payload["roles"]["diff_score"] == "diff_score"
    assert payload["summary"]["graded"]["band"] == [0.455, 0.545]

    # one chunk per 64 rows; latent 5's first example decodes to its tokens and activations
    assert payload["n_chunks"] == 10
    ex = _example_for(payload, chunks, 5)
    assert len(ex) == 6
    toks, nonzero, cut_left, cut_right, label = ex[0]
    original = data.examples[5][0]
    peak = int(np.argmax(original.acts))
    lo = max(0, peak - 40)
    assert [payload["vocab"][t] for t in toks] == original.tokens[lo:peak + 13]
    acts = dict(zip(nonzero[::2], nonzero[1::2]))
    assert acts[peak - lo] == pytest.approx(original.acts[peak], rel=1e-2)
    assert all(original.acts[lo + p] != 0 for p in acts)
    assert (cut_left, label) == (int(lo > 0), original.label)

    # preview column: the strongest token of latent 5's examples is one of its favourites
    strongest = {e.tokens[int(np.argmax(e.acts))].strip() for e in data.examples[5]}
    assert set(values["top_act_tokens"][5].split(" · ")) <= strongest

    metrics = payload["metrics"]
    assert set(metrics) == {"train", "eval"}
    assert metrics["train"]["step"] == sorted(metrics["train"]["step"])
    assert "fvu/chat" in metrics["eval"] and "loss" in metrics["train"]


def test_page_is_self_contained(tmp_path):
    html = render_report(fake_report_data(n_latents=50, n_with_examples=5), tmp_path)\
        .read_text()
    assert (tmp_path / "report.html").exists()
    # nothing is fetched: no external scripts, stylesheets, images, fonts or imports
    assert not re.search(r'<script[^>]+src=|<link|<img|@import|url\(', html)
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", html)


def test_hostile_tokens_cannot_break_out_of_the_script(tmp_path):
    evil = "</script><script>alert(1)</script><!--"
    data = ReportData(
        latents={"latent": [0, 1], "category": ["shared", "chat_only"]},
        title="<b>title</b>",
        examples={1: [Example(["a", evil, "\u2028"], [0.0, 2.0, 1.0])]},
    )
    html = render_report(data, tmp_path / "x.html").read_text()
    n_scripts = html.count("<script")
    assert html.count("</script>") == n_scripts  # only the real closing tags
    assert "<title>&lt;b&gt;title&lt;/b&gt;</title>" in html
    payload, chunks = _embedded(html)
    assert evil in payload["vocab"] and "\u2028" in payload["vocab"]
    assert payload["title"] == "<b>title</b>"


def test_bad_tables_are_refused_with_the_fix():
    with pytest.raises(CrosscodersError, match="'category'"):
        ReportData(latents={"latent": [0, 1]}).columns()
    with pytest.raises(CrosscodersError, match="differ in length"):
        ReportData(latents={"latent": [0, 1], "category": ["shared"]}).columns()
    with pytest.raises(CrosscodersError, match="one activation per token"):
        Example(["a", "b"], [1.0])


def test_clean_json_and_rounding():
    assert round_sig(123456.0, 3) == 123000
    assert round_sig(0.000123456, 3) == 0.000123
    assert round_sig(float("nan")) is None and round_sig(float("inf")) is None
    assert clean_json({"a": np.float32(0.5), "b": [np.int64(3), float("nan")],
                       "c": np.array([True])}) == {"a": 0.5, "b": [3, None], "c": [True]}


# ------------------------------------------------------------------ loaders
def _diff_dir_in_run(tmp_path):
    """A run dir (metrics.jsonl, run.json) holding a diff dir in the diff step's formats."""
    from crosscoders.diff.examples import save_examples

    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": s, "split": "train", "loss": 1.0 / s, "fvu/base": 0.5, "l0": 30.0}
               for s in (10, 20, 30)]
    records.append({"step": 30, "split": "eval", "fvu/base": 0.4, "dead_frac": 0.0})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records)
                                       + '\n{"step": 40, "spl')  # a write cut short
    (run / "run.json").write_text(json.dumps({"crosscoder": {"dict_size": 4,
                                                             "activation": "batchtopk"}}))
    diff = run / "diff"
    diff.mkdir()
    df = pd.DataFrame({
        "latent": np.arange(4), "norm_base": [1.0, 0.0, 0.5, 1.0],
        "norm_chat": [1.0, 1.0, 0.5, 0.0], "rel_norm": [0.5, 1.0, 0.5, 0.0],
        "category": ["shared", "chat_only", "shared", "base_only"],
        "dec_cos": [0.9, 0.1, 0.8, 0.0], "freq": [0.01, 0.002, 0.0, 0.1],
        "nu_r": [np.nan, 0.2, np.nan, np.nan], "nu_eps": [np.nan, 0.1, np.nan, np.nan],
        "truly_chat_only": [False, True, False, False],
    })
    df.to_parquet(diff / "latents.parquet", index=False)
    (diff / "summary.json").write_text(json.dumps({
        "preset": "anthropic", "thresholds": {"convention": "rel_norm", "base_only_below": 0.05},
        "latent_scaling": {"rule": {"nu_r_max": 0.5, "nu_eps_max": 0.2}}}))
    save_examples([
        # the diff step stores text only for ids >= 0 (here position 0 is outside the data)
        {"latent": 1, "kind": "top", "rank": 0, "value": 3.0, "quantile": None, "row": 7,
         "center": 2, "tokens": [-1, 11, 12, 13], "acts": [None, 0.0, 3.0, 0.5],
         "text": ["Ġhello", "Ġworld", "!"]},
        {"latent": 1, "kind": "sample", "rank": 0, "value": 1.0, "quantile": 0.25, "row": 9,
         "center": 1, "tokens": [14, 15], "acts": [0.0, 1.0], "text": None},
        {"latent": 1, "kind": "top", "rank": 1, "value": 2.0, "quantile": None, "row": 8,
         "center": 0, "tokens": [16], "acts": [2.0], "text": ["x"]},
    ], diff / "examples.db")
    (diff / "similarity.json").write_text(json.dumps(
        {"cka": [[0.97]], "svcca": [[0.9]], "rows": ["base/l13"], "cols": ["chat/l13"]}))
    (diff / "lens.json").write_text(json.dumps({"promoted": [
        {"token_id": 5, "token": "ĠSure", "logit": 4.0}], "suppressed": [
        {"token_id": 6, "token": "Ġthe", "logit": -2.0}]}))
    (diff / "top_tokens.json").write_text(json.dumps({"1": {"chat": [["Ġyes", 3.0]]}}))
    return run, diff


def test_load_diff_dir_in_the_diff_formats(tmp_path):
    run, diff = _diff_dir_in_run(tmp_path)
    data = load_report_data(diff)  # the run dir is found: the diff dir sits inside it

    assert list(data.latents["latent"]) == [0, 1, 2, 3]
    assert len(data.metrics) == 4  # the cut-short line is skipped
    assert data.config["crosscoder"]["activation"] == "batchtopk"
    assert data.title.endswith("run")
    ex = data.examples[1]
    assert [e.label for e in ex] == [None, None, "random firing · q0.25"]  # top by rank first
    assert ex[0].tokens == ["Ġhello", "Ġworld", "!"] and ex[0].acts == [0.0, 3.0, 0.5]
    assert ex[2].tokens == ["⟨14⟩", "⟨15⟩"]  # stored as ids only, no tokenizer given
    assert data.similarity == {"cka": 0.97, "svcca": 0.9}
    assert data.lens[0]["promoted"] == [("ĠSure", 4.0)]
    assert data.top_tokens == {1: {"chat": [("Ġyes", 3.0)]}}

    out = build_report(diff, out=tmp_path / "out" / "report.html")
    payload, chunks = _embedded(out.read_text())
    assert payload["roles"] == {"rel_norm": "rel_norm", "cos": "dec_cos", "n_base": "norm_base",
                                "n_chat": "norm_chat", "freq": "freq", "nu_r": "nu_r",
                                "nu_eps": "nu_eps", "truly_chat_only": "truly_chat_only"}
    assert " hello" in payload["vocab"]  # byte-level BPE space marker decoded
    assert payload["metrics"]["eval"]["fvu/base"] == [0.4]


def test_examples_capped_and_tokenizer_used(tmp_path):
    _, diff = _diff_dir_in_run(tmp_path)
    capped = examples_from_sqlite(diff / "examples.db", max_examples=1,
                                  token_strings=lambda ids: [f"t{i}" for i in ids])
    assert len(capped[1]) == 1
    full = examples_from_sqlite(diff / "examples.db",
                                token_strings=lambda ids: [f"t{i}" for i in ids])
    assert full[1][2].tokens == ["t14", "t15"]


def test_missing_table_names_the_fix(tmp_path):
    with pytest.raises(CrosscodersError, match="crosscoders diff"):
        load_report_data(tmp_path)


def test_adapters_read_what_diff_writes():
    sim = similarity_adapter({"cka": [[0.9, 0.5], [0.4, 0.8]], "rows": ["b0", "b1"],
                              "cols": ["c0", "c1"]})
    assert sim == {"cka": {"b0 / c0": 0.9, "b0 / c1": 0.5, "b1 / c0": 0.4, "b1 / c1": 0.8}}
    lens = lens_adapter({"n_positions": 5, "norm": 2.0,
                         "promoted": [{"token_id": 3, "token": "a", "logit": 1.0}],
                         "suppressed": [{"token_id": 4, "token": "b", "logit": -1.0}]})
    assert lens == [{"position": "mean of the first tokens", "promoted": [("a", 1.0)],
                     "suppressed": [("b", -1.0)], "norm": 2.0}]
    assert lens_adapter(None) == [] and similarity_adapter("x") == {}
    # names nobody writes are not read: no aliases
    assert lens_adapter({"top": [["a", 1.0]], "bottom": [["b", -1.0]]}) == []
    assert similarity_adapter({"cka": [[0.9, 0.5]], "base_sites": ["b0"]}) == {
        "cka": {"base 0 / chat 0": 0.9, "base 0 / chat 1": 0.5}}


def test_decoder_top_tokens_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    W_dec = torch.randn(6, 2, 8, generator=gen)
    W_U = {"base": (0, torch.randn(8, 20, generator=gen)),
           "chat": (1, torch.randn(8, 20, generator=gen))}
    vocab = [f"tok{v}" for v in range(20)]
    top = decoder_top_tokens(W_dec, W_U, vocab, k=3, latents=[1, 4], batch=1)
    assert set(top) == {1, 4}
    for i in (1, 4):
        for name, (s, U) in W_U.items():
            logits = W_dec[i, s] @ U
            want = logits.argsort(descending=True)[:3].tolist()
            assert [t for t, _ in top[i][name]] == [vocab[v] for v in want]
            assert top[i][name][0][1] == pytest.approx(float(logits.max()), rel=1e-5)


def test_cli_functions(tmp_path, capsys):
    _, diff = _diff_dir_in_run(tmp_path)
    assert cli_main(["report", str(diff), "--out", str(tmp_path / "cli.html"), "--title",
                     "T"]) == 0
    payload, _ = _embedded((tmp_path / "cli.html").read_text())
    assert payload["title"] == "T"
    assert "cli.html" in capsys.readouterr().out


def test_every_script_is_inlined_once_in_order(tmp_path):
    """Each page's scripts are files in report/static, each inlined once, data.js (which
    creates the shared namespace) first and main.js (which draws the page) last; the diff
    and layers pages between them use every file, and share all but their sections."""
    from importlib import resources

    from crosscoders.report.layers import LAYER_SCRIPTS, render_layers_report
    from crosscoders.report.render import SCRIPTS
    from crosscoders.testing import fake_layers_data

    static = resources.files("crosscoders.report").joinpath("static")
    on_disk = sorted(p.name for p in static.iterdir() if p.name.endswith(".js"))
    assert sorted(set(SCRIPTS) | set(LAYER_SCRIPTS)) == on_disk
    assert set(LAYER_SCRIPTS) - set(SCRIPTS) == {"layers.js"}
    # inlined as is: a script must not hold the text that would open or end a script element
    assert not any("<script" in static.joinpath(n).read_text("utf-8").lower() or "</script" in
                   static.joinpath(n).read_text("utf-8").lower() for n in on_disk)
    diff_page = render_report(ReportData(latents={"latent": [0], "category": ["shared"]}),
                              tmp_path / "r.html").read_text()
    layers_page = render_layers_report(fake_layers_data(n_latents=20, n_with_examples=0),
                                       tmp_path / "l.html").read_text()
    for scripts, html in ((SCRIPTS, diff_page), (LAYER_SCRIPTS, layers_page)):
        assert scripts[0] == "data.js" and scripts[-1] == "main.js"
        starts = [html.find(static.joinpath(name).read_text("utf-8")) for name in scripts]
        assert all(s > 0 for s in starts) and starts == sorted(starts)
    assert static.joinpath("layers.js").read_text("utf-8") not in diff_page
