"""The layers stage and its report: `crosscoders run` on one model at several sites writes
FVU per layer, contexts per latent and layer, and one offline HTML page that holds them;
`crosscoders report` renders a layers directory.

One tiny experiment (the `layers` example with a 3-layer random LM at tiny size) is run once
through the CLI; the checks recompute what it wrote by brute force.
"""

import contextlib
import io
import json
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from crosscoders.cli import main as cli_main
from crosscoders.errors import DataError
from crosscoders.layers import firing_frequency
from crosscoders.layers.examples import choose_latents, layer_of_kind
from crosscoders.layers.study import LayerFiles, check_comparison, read_comparison
from crosscoders.model import Crosscoder
from crosscoders.pipeline.examples import example_text
from crosscoders.report import build_report, load_layers_data, render_layers_report
from crosscoders.report.layers import is_layers_dir
from crosscoders.store import ActivationStore
from crosscoders.testing import fake_layers_data

pd = pytest.importorskip("pandas")
SITES = ["resid_out:0", "resid_out:1", "resid_out:2"]


def _embedded(html: str) -> tuple[dict, dict[int, dict]]:
    main = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html,
                     re.S)
    chunks = {int(n): json.loads(body) for n, body in re.findall(
        r'<script type="application/json" id="chunk-(\d+)">(.*?)</script>', html, re.S)}
    return json.loads(main.group(1)), chunks


def layers_config(root: Path, out: Path, **layers) -> Path:
    """The shipped `layers` example, pointed at a tiny local LM and cut to a tiny size."""
    cfg = yaml.safe_load(example_text("layers"))
    cfg["out"] = str(out)
    harvest = cfg["harvest"]
    harvest["models"][0].update(path=str(root / "lm"), sites=SITES)
    harvest["data"] = [{"path": str(root / "text.jsonl"), "format": "text"}]
    harvest.update(tokens=2000, context_length=16, batch_size=8, dtype="float32",
                   device="cpu", eval_tokens=0.2)
    cfg["crosscoder"].update(k=4, expansion=2)
    cfg["train"].update(steps=40, batch_size=64, device="cpu", eval_tokens=64,
                        norm_sample_tokens=256, progress=False)
    cfg["layers"].update(max_tokens=1500, example_latents=12, n_examples=5, **layers)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """The tiny layers experiment, run once through `crosscoders run`: (out dir, stdout)."""
    from crosscoders.testing import make_model, make_tokenizer, write_text_corpus

    root = tmp_path_factory.mktemp("layers_exp")
    make_model(root / "lm", "llama", tokenizer=make_tokenizer(), d_model=16, n_layers=3)
    write_text_corpus(root / "text.jsonl", 80)
    config = layers_config(root, root / "exp")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli_main(["run", str(config), "--no-progress"]) == 0
    return root, stdout.getvalue()


def test_pipeline_writes_the_layers_report_and_prints_its_path(experiment, capsys):
    root, stdout = experiment
    layers = root / "exp" / "layers"
    for name in (LayerFiles.TABLE_CSV, LayerFiles.SUMMARY, LayerFiles.EXAMPLES,
                 LayerFiles.REPORT):
        assert (layers / name).is_file(), name
    assert f"report: {layers / LayerFiles.REPORT}" in stdout
    assert re.search(r"^FVU per layer \(on \d+ held-out tokens\): lm/resid_out:0 ", stdout,
                     re.M)
    # a second run redoes nothing and still names the report
    assert cli_main(["run", str(root / "exp.yaml"), "--no-progress"]) == 0
    again = capsys.readouterr().out
    assert re.search(r"^  layers +skipped", again, re.M)
    assert f"report: {layers / LayerFiles.REPORT}" in again


def test_firing_and_fvu_match_brute_force(experiment):
    root, _ = experiment
    store = ActivationStore.open(root / "exp" / "store")
    model = Crosscoder.load(root / "exp" / "crosscoder")
    table = pd.read_csv(root / "exp" / "layers" / LayerFiles.TABLE_CSV)
    summary = json.loads((root / "exp" / "layers" / LayerFiles.SUMMARY).read_text())
    # firing counted as `crosscoders layers --data` counts it, on the first max_tokens
    np.testing.assert_array_equal(table["freq"].to_numpy(),
                                  firing_frequency(model, store, 1500))
    # FVU per layer, pooled over the held-out tokens
    assert store.n_eval > 0
    assert summary["evaluated"] == {"split": "held-out", "n_tokens": store.n_eval}
    x = store.rows(store.n_train, store.n_tokens).double()
    with torch.no_grad():
        xhat = model.double()(x)
    err_S = (x - xhat).pow(2).sum((0, 2))
    var_S = (x - x.mean(0)).pow(2).sum((0, 2))
    expected = dict(zip(summary["sources"], (err_S / var_S).tolist()))
    assert list(summary["fvu"]) == summary["sources"]
    for name, value in expected.items():
        assert summary["fvu"][name] == pytest.approx(value, rel=1e-4)
    assert summary["run_dir"] == str((root / "exp" / "crosscoder").resolve())


def test_examples_are_the_strongest_per_latent_and_per_layer(experiment):
    """Every stored value is what the model gives at that row, and the first of each group
    is the largest over the held-out rows: activation (top), layer s's input term
    x_s . W_enc[s, :, i] (layer:s)."""
    root, _ = experiment
    store = ActivationStore.open(root / "exp" / "store")
    model = Crosscoder.load(root / "exp" / "crosscoder").double()
    summary = json.loads((root / "exp" / "layers" / LayerFiles.SUMMARY).read_text())
    con = sqlite3.connect(root / "exp" / "layers" / LayerFiles.EXAMPLES)
    rows = con.execute("SELECT latent, kind, rank, value, row FROM examples").fetchall()
    con.close()
    table = pd.read_csv(root / "exp" / "layers" / LayerFiles.TABLE_CSV)
    chosen = sorted({r[0] for r in rows})
    assert 0 < len(chosen) <= 12 == summary["examples"]["n_latents"]
    assert (table["first"].to_numpy()[chosen] >= 0).all()  # counted latents only

    x = store.rows(store.n_train, store.n_tokens).double()
    with torch.no_grad():
        f = model.encode(x)  # [N, F]
        term = torch.einsum("nsd,fsd->nfs", x, model.W_enc_FSD.double())  # [N, F, S]
    seen_layers = set()
    for latent, kind, rank, value, row in rows:
        i = row - store.n_train
        assert 0 <= i < len(x)  # from the held-out rows
        s = layer_of_kind(kind)
        if kind == "top":
            assert value == pytest.approx(float(f[i, latent]), rel=1e-4, abs=1e-6)
            if rank == 0:
                assert value == pytest.approx(float(f[:, latent].max()), rel=1e-4)
        else:
            seen_layers.add(s)
            assert f[i, latent] > 0 and value > 0
            assert value == pytest.approx(float(term[i, latent, s]), rel=1e-4, abs=1e-6)
            if rank == 0:
                fired = f[:, latent] > 0
                assert value == pytest.approx(float(term[fired, latent, s].max()), rel=1e-4)
    assert seen_layers == {0, 1, 2}


def test_loader_round_trip(experiment):
    root, _ = experiment
    layers = root / "exp" / "layers"
    assert is_layers_dir(layers) and not is_layers_dir(root / "exp" / "crosscoder")
    data = load_layers_data(layers, max_examples=3)
    written = pd.read_csv(layers / LayerFiles.TABLE_CSV)
    cols = data.columns()
    for name in written.columns:
        if written[name].dtype.kind == "f":
            np.testing.assert_allclose(cols[name], written[name].to_numpy())
        else:
            assert list(cols[name]) == list(written[name]), name
    assert data.sources() == [f"lm/{s}" for s in SITES]
    con = sqlite3.connect(layers / LayerFiles.EXAMPLES)
    with_top = {r[0] for r in con.execute("SELECT latent FROM examples WHERE kind = 'top'")}
    con.close()
    assert set(data.examples) == with_top
    for exs in data.examples.values():
        assert 0 < len(exs) <= 3
        for ex in exs:  # stored with the tokenizer's text, one activation per token
            assert len(ex.tokens) == len(ex.acts) and all(isinstance(t, str) for t in ex.tokens)
            assert not any(t.startswith("⟨") for t in ex.tokens)
    assert data.layer_examples
    for groups in data.layer_examples.values():  # in depth order
        assert list(groups) == [s for s in data.sources() if s in groups]
    # the training run, found through the summary
    assert data.metrics and data.config["crosscoder"]["n_sources"] == 3


def test_page_is_one_offline_file_holding_the_data(experiment):
    root, _ = experiment
    layers = root / "exp" / "layers"
    html = (layers / LayerFiles.REPORT).read_text()
    assert not re.search(r'<script[^>]+src=|<link|<img|@import|url\(', html)
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", html)
    payload, chunks = _embedded(html)
    table = pd.read_csv(layers / LayerFiles.TABLE_CSV)
    values = payload["table"]["values"]
    assert values["latent"] == table["latent"].tolist()
    counted = table["first"].to_numpy() >= 0
    expected = np.where(counted, table["peak_name"], np.where(table["freq"] > 0, "rare", "dead"))
    assert values["category"] == expected.tolist()
    assert values["span"] == table["span"].tolist()
    lay = payload["layers"]
    assert lay["sources"] == [f"lm/{s}" for s in SITES]
    for name, norms in zip(lay["sources"], lay["norms"]):
        np.testing.assert_allclose(norms, table[f"norm/{name}"], rtol=1e-3)
    summary = json.loads((layers / LayerFiles.SUMMARY).read_text())
    assert lay["fvu"] == pytest.approx(summary["fvu"], rel=1e-3)
    # a chosen latent's card data: its top contexts and its contexts per layer
    latent = next(iter(load_layers_data(layers).layer_examples))
    row = values["latent"].index(latent)
    card = chunks[row // payload["chunk_size"]][str(latent)]
    assert card["ex"] and set(card["exg"]) <= set(lay["sources"])
    assert "crosscoders report, layers.js" in html


def test_report_command_renders_a_layers_dir(experiment, tmp_path, capsys):
    root, _ = experiment
    layers = root / "exp" / "layers"
    out = tmp_path / "again.html"
    assert cli_main(["report", str(layers), "--out", str(out), "--title", "T"]) == 0
    assert str(out) in capsys.readouterr().out
    payload, _ = _embedded(out.read_text())
    assert payload["title"] == "T" and payload["layers"]["sources"]
    # the Python entry point too, by default into the layers dir
    assert build_report(layers) == layers / LayerFiles.REPORT


def test_comparison_from_bench_is_drawn_and_a_bad_one_refused(experiment, tmp_path, capsys):
    root, _ = experiment
    bench = tmp_path / "bench.json"
    assert cli_main(["bench", "layers", "--layers", "2", "--d-model", "8", "--steps", "5",
                     "--json", str(bench)]) == 0
    capsys.readouterr()
    comparison = read_comparison(bench)
    data = fake_layers_data(n_latents=50, n_with_examples=0)
    data.comparison = comparison
    payload, _ = _embedded(render_layers_report(data, tmp_path / "c.html").read_text())
    drawn = payload["layers"]["comparison"]
    assert [p["k"] for p in drawn["crosscoder"]] == [p["k"] for p in comparison["crosscoder"]]
    assert len(drawn["matched"]) == len(comparison["matched"])

    for bad, words in (([1, 2], "expected a JSON object"),
                       ({"crosscoder": [], "matched": []}, "no list 'per_layer_saes'"),
                       ({**comparison, "crosscoder": [{"k": 2, "l0": "x", "fvu": 0.1}]},
                        "needs numbers k, l0 and fvu")):
        with pytest.raises(DataError, match=words):
            check_comparison(bad, "bench.json")
    # through the pipeline: refused, with the fix named, before any work
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"crosscoder": []}))
    config = layers_config(root, tmp_path / "exp2", compare=str(broken))
    assert cli_main(["run", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(broken) in err[0] and "crosscoders bench layers" in err[0]
    assert not (tmp_path / "exp2" / "store").exists()


def test_contexts_per_layer_read_in_depth_order(tmp_path):
    """Kinds sort as text (layer:10 before layer:2); the loader returns layers by depth,
    each strongest first, cut to max_examples, labelled with the layer's input term."""
    from crosscoders.diff.examples import save_examples
    from crosscoders.report.layers import layer_examples_from_sqlite

    def rec(kind, rank, value):
        return {"latent": 7, "kind": kind, "rank": rank, "value": value, "row": rank,
                "tokens": [1, 2], "acts": [0.0, value], "text": ["a", "b"]}

    records = [rec("layer:10", 0, 3.0), rec("layer:2", 1, 1.0), rec("layer:2", 0, 2.0),
               rec("top", 0, 5.0), rec("layer:2", 2, 0.5)]
    save_examples(records, tmp_path / "examples.db")
    names = [f"L{s}" for s in range(12)]
    top, by_layer = layer_examples_from_sqlite(tmp_path / "examples.db", names, max_examples=2)
    assert [e.acts for e in top[7]] == [[0.0, 5.0]]
    assert list(by_layer[7]) == ["L2", "L10"]
    assert [e.acts[1] for e in by_layer[7]["L2"]] == [2.0, 1.0]
    assert by_layer[7]["L10"][0].label == "layer input 3"


def test_report_of_profiles_alone(tmp_path):
    """`crosscoders layers` without --data writes profiles only: the report shows them, and
    leaves out what needs data (FVU, contexts)."""
    from crosscoders import Crosscoder as CC
    from crosscoders import CrosscoderConfig
    from crosscoders.layers import layer_profile

    model = CC(CrosscoderConfig(n_sources=4, d_model=8, dict_size=32, k=2,
                                source_names=["a", "b", "c", "d"]))
    with torch.no_grad():  # latent i writes only layer i % 4
        model.W_dec.mul_(torch.nn.functional.one_hot(torch.arange(32) % 4, 4)[..., None])
    layer_profile(model).save(tmp_path / "layers", plot=False)
    assert is_layers_dir(tmp_path / "layers")
    path = build_report(tmp_path / "layers")
    payload, chunks = _embedded(path.read_text())
    values = payload["table"]["values"]
    assert values["category"] == [["a", "b", "c", "d"][i % 4] for i in range(32)]
    assert values["span"] == [1] * 32 and payload["categories"] == ["a", "b", "c", "d"]
    assert payload["layers"]["fvu"] is None and payload["layers"]["comparison"] is None
    assert not chunks and not payload["has_examples"] and "sort" not in payload


def test_choose_latents_takes_each_peak_layer_in_turn():
    peak = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    freq = np.array([0.1, 0.3, 0.2, 0.5, 0.4, 0.01, 0.02, 0.03, 0.04])
    counted = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0], bool)
    # round 1: the most frequent of each layer (1, 3, 7); round 2: the next (2, 4, 6)
    assert choose_latents(peak, counted, freq, 3).tolist() == [1, 3, 7]
    assert choose_latents(peak, counted, freq, 6).tolist() == [1, 2, 3, 4, 6, 7]
    assert choose_latents(peak, counted, freq, 100).tolist() == list(range(8))
    assert choose_latents(peak, counted, freq, 0).tolist() == []


def test_layer_study_refuses_data_of_unknown_length_before_writing(tmp_path):
    """An iterable of batches has no length (the stage reads by row, twice): a DataError
    naming the fix, and no output directory left behind."""
    from crosscoders import Crosscoder as CC
    from crosscoders import CrosscoderConfig
    from crosscoders.data import IterableSource
    from crosscoders.layers import run_layer_study

    model = CC(CrosscoderConfig(n_sources=2, d_model=4, dict_size=8, k=1))
    batches = [torch.randn(5, 2, 4) for _ in range(3)]
    with pytest.raises(DataError, match="known length.*crosscoders harvest"):
        run_layer_study(model, IterableSource(batches), tmp_path / "layers")
    assert not (tmp_path / "layers").exists()
