"""Export to other codebases' formats and publishing on the Hugging Face Hub, offline.

Exports are checked twice: our importer reads them back to the same encode/decode, and the
other codebase's documented forward pass (docs/formats.md), computed here from the written
files, matches ours on raw activations. Hub calls are replaced by local stand-ins: the
upload by one that copies the staged folder into a fake remote, the download by one that
returns it, as the importer's hub tests do.
"""

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from crosscoders import Crosscoder, CrosscoderConfig
from crosscoders.cli import main as cli_main
from crosscoders.errors import CrosscodersError
from crosscoders.formats import export_crosscoder, import_crosscoder

S, D, F = 2, 12, 64


def _acts(n=300, S=S, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, S, D, generator=gen) * 3 + torch.randn(S, D, generator=gen)


def _model(activation="batchtopk", S=S, dec_norm="sum", scale=None, names=None, seed=0,
           **extra):
    """Random weights (and thresholds) that leave some latents active, some not."""
    config = CrosscoderConfig(n_sources=S, d_model=D, dict_size=F, activation=activation,
                              k=6, dec_norm=dec_norm, source_names=names, **extra)
    model = Crosscoder(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if not (model.has_designated_latents or config.causality != "acausal"):
            model.W_enc_FSD.copy_(torch.randn(F, S, D, generator=gen) * 0.3)
            model.W_dec.copy_(torch.randn(F, S, D, generator=gen) * 0.3)
        model.b_enc.copy_(torch.randn(F, generator=gen) * 0.5 - 0.5)
        model.b_dec.copy_(torch.randn(S, D, generator=gen))
        if scale is not None:
            model.fold_normalisation(torch.tensor(scale))
        pre = model.preactivations(_acts(S=S))
        if activation == "batchtopk":
            scores = torch.relu(pre) * model.decoder_norm_weights()
            model.activation.threshold.fill_(float(scores[scores > 0].quantile(0.7)))
            model.activation.threshold_updates.fill_(1)
        if activation == "jumprelu":
            theta = pre.clamp_min(1e-3).quantile(0.6, dim=0)
            model.activation.log_threshold.copy_(theta.log())
    return model.eval()


def _same_outputs(a, b, x, exact):
    with torch.no_grad():
        f_a, f_b = a.encode(x), b.encode(x)
        tol = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-5, "atol": 1e-5}
        torch.testing.assert_close(f_b, f_a, **tol)
        torch.testing.assert_close(b.decode(f_a), a.decode(f_a), **tol)
    assert 0 < (f_a > 0).float().mean() < 0.9


# ------------------------------------------------------------------ dictionary_learning


def _dl_forward(state, x_BLD):
    """dictionary_learning's CrossCoder / BatchTopKCrossCoder (use_threshold=True), from
    its documented formulas, with its normaliser."""
    mean, s = state["activation_mean"], state["activation_global_scale"]
    has_norm = not bool(torch.isnan(mean).any() or torch.isnan(state["activation_std"]).any())
    xn = (x_BLD - mean) * s[None, :, None] if has_norm else x_BLD
    post = torch.relu(torch.einsum("bld,ldf->bf", xn, state["encoder.weight"])
                      + state["encoder.bias"])
    W = state["decoder.weight"]
    code = {1: W.norm(dim=2).sum(0), 2: W.norm(dim=(0, 2))}[int(state["code_normalization_id"])]
    f = post * (post * code > state["threshold"]) if "threshold" in state else post
    y = torch.einsum("bf,lfd->bld", f, W) + state["decoder.bias"]
    return f, (y / (s[None, :, None] + 1e-8) + mean if has_norm else y)


@pytest.mark.parametrize("activation", ["batchtopk", "relu"])
@pytest.mark.parametrize("scale", [None, [0.25, 4.0]])
@pytest.mark.parametrize("dec_norm", ["sum", "concat"])
def test_dictionary_learning_export_round_trip(tmp_path, activation, scale, dec_norm):
    model = _model(activation, dec_norm=dec_norm, scale=scale)
    out = tmp_path / "dl"
    assert export_crosscoder(model, "dictionary_learning", out) == []
    state = load_file(str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    assert config["dict_class"] == ("BatchTopKCrossCoder" if activation == "batchtopk"
                                     else "CrossCoder")
    assert (config["activation_dim"], config["dict_size"], config["num_layers"]) == (D, F, S)
    assert config["code_normalization"] == {"sum": "CROSSCODER", "concat": "SAE"}[dec_norm]
    if scale is not None:  # the normaliser's documented relation holds for what we wrote
        rebuilt = state["target_rms"] / torch.sqrt((state["activation_std"] ** 2).sum(-1) + 1e-8)
        torch.testing.assert_close(rebuilt, torch.tensor(scale))
    x = _acts()
    f_ref, y_ref = _dl_forward(state, x)
    with torch.no_grad():
        f = model.encode(x)
        torch.testing.assert_close(f, f_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model.decode(f), y_ref, rtol=1e-4, atol=1e-4)
    # their decoder norms are ours (the units the sparsity penalty saw)
    torch.testing.assert_close(state["decoder.weight"].norm(dim=-1).T, model.decoder_norms())
    again = import_crosscoder(out, source_names=model.config.source_names)
    assert again.config.activation == activation and again.config.dec_norm == dec_norm
    assert again.is_folded == (scale is not None)
    _same_outputs(model, again, x, exact=scale is None)


# ------------------------------------------------------------------ crosscode


def _crosscode_forward(state, cfg, x_BMPD):
    pre = torch.einsum("bmpd,mpdf->bf", x_BMPD, state["_W_enc_XiDiL"]) + state["b_enc_L"]
    if cfg["activation_fn"]["classname"] == "AnthropicSTEJumpReLUActivation":
        f = pre * (pre > state["_activation_fn.log_threshold_L"].exp())
    else:
        f = torch.relu(pre)
    return f, torch.einsum("bf,fmpd->bmpd", f, state["_W_dec_LXoDo"]) + state["_b_dec_XoDo"]


@pytest.mark.parametrize("activation,names,grid,scale", [
    ("jumprelu", ["base/resid_out:3", "chat/resid_out:3"], (2, 1), [0.5, 2.0]),
    ("relu", ["m/layer0", "m/layer1", "m/layer2"], (1, 3), None),
    ("relu", None, (2, 1), [3.0, 0.2]),
])
def test_crosscode_export_round_trip(tmp_path, activation, names, grid, scale):
    n = len(names) if names else S
    model = _model(activation, S=n, names=names, scale=scale)
    out = tmp_path / "cc"
    export_crosscoder(model, "crosscode", out)
    cfg = yaml.safe_load((out / "model_cfg.yaml").read_text())  # plain YAML, no tags
    state = torch.load(out / "model.pt", weights_only=True)
    M, P = grid
    assert (cfg["n_models"], cfg["n_hookpoints"], cfg["d_model"], cfg["n_latents"]) == (
        M, P, D, F)
    assert cfg["dtype"] == "float32" and bool(state["is_folded"]) == (scale is not None)
    if scale is not None:
        torch.testing.assert_close(state["folded_scaling_factors_in_Xi"],
                                   torch.tensor(scale).reshape(M, P))
    x = _acts(S=n)
    f_ref, y_ref = _crosscode_forward(state, cfg, x.reshape(-1, M, P, D))
    with torch.no_grad():
        f = model.encode(x)
        torch.testing.assert_close(f, f_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model.decode(f), y_ref.reshape(-1, n, D), rtol=1e-4,
                                   atol=1e-4)
    again = import_crosscoder(out)
    assert again.config.source_names == model.config.names  # read back from model_cfg.yaml
    assert again.config.activation == activation and again.is_folded == (scale is not None)
    if activation == "jumprelu":
        assert again.config.jumprelu_bandwidth == model.config.jumprelu_bandwidth
    _same_outputs(model, again, x, exact=True)


def test_structure_kept_only_as_weights_is_noted(tmp_path, capsys):
    designated = _model("relu", n_shared_latents=8, n_exclusive_latents=[4, 4])
    notes = export_crosscoder(designated, "crosscode", tmp_path / "a")
    assert len(notes) == 1 and "8 shared and 8 exclusive" in notes[0]
    _same_outputs(designated, import_crosscoder(tmp_path / "a"), _acts(), exact=True)
    causal = _model("batchtopk", S=3, names=["m/l0", "m/l1", "m/l2"], dec_norm="concat",
                    causality="weakly_causal")
    causal.save(tmp_path / "run")
    assert cli_main(["export", str(tmp_path / "run"), "--format", "dictionary_learning",
                     "--out", str(tmp_path / "b")]) == 0
    printed = capsys.readouterr().out
    assert "note: the weakly causal masks" in printed and "as dictionary_learning" in printed
    again = import_crosscoder(tmp_path / "b", source_names=causal.config.names)
    _same_outputs(causal, again, _acts(S=3), exact=True)


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize("format,activation,reason,fix", [
    ("dictionary_learning", "topk", "no per-token TopK", "crosscoders push"),
    ("dictionary_learning", "jumprelu", "no JumpReLU", "--format crosscode"),
    ("crosscode", "topk", "rank raw pre-activations", "crosscoders push"),
    ("crosscode", "batchtopk", "no inference threshold", "--format dictionary_learning"),
])
def test_inexpressible_models_are_refused_before_writing(tmp_path, capsys, format,
                                                         activation, reason, fix):
    _model(activation).save(tmp_path / "run")
    out = tmp_path / "out"
    assert cli_main(["export", str(tmp_path / "run"), "--format", format,
                     "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert reason in err and fix in err
    assert not out.exists()


def test_untrained_batchtopk_and_non_empty_out_are_refused(tmp_path, capsys):
    untrained = Crosscoder(CrosscoderConfig(n_sources=S, d_model=D, dict_size=F, k=4))
    with pytest.raises(CrosscodersError, match="never trained.*train it first"):
        export_crosscoder(untrained, "dictionary_learning", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    _model().save(tmp_path / "run")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli_main(["export", str(tmp_path / "run"), "--format", "dictionary_learning",
                     "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is not empty (holds keep.txt)" in err and "new directory" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    (out / "keep.txt").unlink()  # an empty directory is fine
    assert cli_main(["export", str(tmp_path / "run"), "--format", "dictionary_learning",
                     "--out", str(out)]) == 0


# ------------------------------------------------------------------ the Hub


class FakeHub:
    """Stand-in for huggingface_hub.HfApi: copies each uploaded folder into ``remote``."""

    def __init__(self, remote: Path, user="me", orgs=("my-lab",), role="write", fail=None):
        self.remote, self.calls, self.fail = remote, [], fail or {}
        self.who = {"name": user, "orgs": [{"name": o} for o in orgs],
                    "auth": {"accessToken": {"role": role}}}

    def _call(self, name, **kwargs):
        self.calls.append((name, kwargs))
        if name in self.fail:
            raise self.fail[name]

    def whoami(self):
        self._call("whoami")
        return self.who

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self._call("create_repo", repo_id=repo_id, private=private, exist_ok=exist_ok)

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, commit_message=None):
        self._call("upload_folder", repo_id=repo_id, path_in_repo=path_in_repo)
        target = self.remote / repo_id / (path_in_repo or "")
        shutil.copytree(folder_path, target, dirs_exist_ok=True)

    def names(self):
        return [name for name, _ in self.calls]


def _http_error(status, cls_name="HfHubHTTPError"):
    from huggingface_hub import errors

    response = SimpleNamespace(status_code=status, headers={}, request=None)
    return getattr(errors, cls_name)(f"{status} Client Error", response=response)


def _serve(monkeypatch, remote, seen=None):
    """snapshot_download answered from the fake remote."""
    import huggingface_hub

    def fake_snapshot_download(repo_id, allow_patterns=None, **options):
        if seen is not None:
            seen.append((repo_id, allow_patterns, options))
        return str(remote / repo_id)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)


def _run_dir(tmp_path):
    """A finished run as `crosscoders train` leaves it, reading a store made by harvest."""
    store = tmp_path / "store"
    store.mkdir()
    names = ["base/resid_out:3", "chat/resid_out:3"]
    (store / "manifest.json").write_text(json.dumps({"sources": [
        {"name": names[0], "model": "base", "path": "HuggingFaceTB/SmolLM2-135M",
         "site": "resid_out:3"},
        {"name": names[1], "model": "chat", "path": "HuggingFaceTB/SmolLM2-135M-Instruct",
         "site": "resid_out:3"}]}))
    model = _model(names=names, scale=[0.5, 0.8])
    model.metadata = {"train": {"batch_size": 256}, "steps_trained": 40,
                      "data": {"kind": "activation_store", "path": str(store)}}
    run = tmp_path / "run"
    model.save(run)
    records = [{"step": 40, "split": "train", "l0": 9.0, "dead_frac": 0.5,
                f"fvu/{names[0]}": 0.5, f"fvu/{names[1]}": 0.6},
               {"step": 40, "split": "eval", "l0": 6.5, "dead_frac": 0.125,
                f"fvu/{names[0]}": 0.25, f"fvu/{names[1]}": 0.375}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "checkpoint.pt").write_bytes(b"optimizer state: not for the Hub")
    return model, run


def _diff_dir(tmp_path):
    diff = tmp_path / "diff"
    diff.mkdir()
    for name in ("latents.parquet", "latents.csv", "similarity.json"):
        (diff / name).write_text("{}" if name.endswith("json") else "table")
    (diff / "summary.json").write_text(json.dumps({
        "preset": "minder", "counts": {"shared": 50, "base_only": 3, "chat_only": 4,
                                       "other": 7}}))
    (diff / "examples.db").write_bytes(b"big")
    (diff / "report.html").write_text("<html>report</html>")
    return diff


def test_push_then_from_pretrained_gives_the_same_model_and_a_parseable_card(
        tmp_path, monkeypatch):
    from huggingface_hub import ModelCard, metadata_load

    model, run = _run_dir(tmp_path)
    hub = FakeHub(tmp_path / "remote")
    url = Crosscoder.load(run).push_to_hub("my-lab/cc", run_dir=run,
                                           diff_dir=_diff_dir(tmp_path), api=hub)
    assert url == "https://huggingface.co/my-lab/cc"
    assert hub.names() == ["whoami", "create_repo", "upload_folder"]
    pushed = tmp_path / "remote" / "my-lab" / "cc"
    assert sorted(str(p.relative_to(pushed)) for p in pushed.rglob("*") if p.is_file()) == [
        "README.md", "config.json", "diff/latents.csv", "diff/latents.parquet",
        "diff/report.html", "diff/similarity.json", "diff/summary.json", "metrics.jsonl",
        "model.safetensors"]

    meta = metadata_load(pushed / "README.md")  # huggingface_hub's own parser
    card = ModelCard.load(pushed / "README.md")
    assert meta["library_name"] == card.data.library_name == "crosscoders"
    assert meta["base_model"] == ["HuggingFaceTB/SmolLM2-135M",
                                  "HuggingFaceTB/SmolLM2-135M-Instruct"]
    cc = meta["crosscoder"]
    assert [(s["name"], s["model"], s["site"]) for s in cc["sources"]] == [
        ("base/resid_out:3", "HuggingFaceTB/SmolLM2-135M", "resid_out:3"),
        ("chat/resid_out:3", "HuggingFaceTB/SmolLM2-135M-Instruct", "resid_out:3")]
    assert (cc["activation"], cc["k"], cc["dict_size"], cc["training_tokens"]) == (
        "batchtopk", 6, F, 40 * 256)
    assert cc["fvu"] == {"base/resid_out:3": 0.25, "chat/resid_out:3": 0.375}  # held out
    assert (cc["l0"], cc["dead_fraction"]) == (6.5, 0.125)
    assert cc["categories"] == {"shared": 50, "base_only": 3, "chat_only": 4, "other": 7}
    assert 'Crosscoder.from_pretrained("my-lab/cc")' in card.text
    assert "diff/report.html" in card.text

    seen = []
    _serve(monkeypatch, tmp_path / "remote", seen)
    again = Crosscoder.from_pretrained("my-lab/cc", revision="v1")
    assert seen == [("my-lab/cc", ["config.json", "model.safetensors"], {"revision": "v1"})]
    assert again.config == model.config and again.metadata == model.metadata
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    _same_outputs(model, again, _acts(), exact=True)
    assert seen[1:] == [] and Crosscoder.from_pretrained(run).config == model.config  # local


def test_cli_push_to_a_subfolder(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    _, run = _run_dir(tmp_path)
    hub = FakeHub(tmp_path / "remote")
    for name in ("whoami", "create_repo", "upload_folder"):
        monkeypatch.setattr(huggingface_hub.HfApi, name,
                            lambda self, *a, _n=name, **kw: getattr(hub, _n)(*a, **kw))
    assert cli_main(["push", str(run), "me/crosscoders/layer3", "--private"]) == 0
    assert "pushed 64-latent crosscoder to https://huggingface.co/me/crosscoders/tree/main/" \
           "layer3" in capsys.readouterr().out
    assert hub.calls[1] == ("create_repo", {"repo_id": "me/crosscoders", "private": True,
                                            "exist_ok": True})
    assert hub.calls[2][1]["path_in_repo"] == "layer3"
    _serve(monkeypatch, tmp_path / "remote")
    assert Crosscoder.from_pretrained("me/crosscoders/layer3").dict_size == F
    card = (tmp_path / "remote" / "me" / "crosscoders" / "layer3" / "README.md").read_text()
    assert 'from_pretrained("me/crosscoders/layer3")' in card


def test_missing_token_is_one_line_naming_the_login(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    _, run = _run_dir(tmp_path)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH",
                        str(tmp_path / "no-token"))
    assert cli_main(["push", str(run), "me/cc"]) == 2  # the real HfApi: no network needed
    err = capsys.readouterr().err
    assert err.startswith("error: no Hugging Face token found") and err.count("\n") == 1
    assert "hf auth login" in err


@pytest.mark.parametrize("fail,orgs,role,expected", [
    ({"whoami": _http_error(401)}, ["someone"], "write",
     "rejected your token (401 Unauthorized: missing, invalid or expired)"),
    ({}, ["my-lab"], "write",
     "someone/cc is not yours: your token is for me (organisations: my-lab); push to me/cc"),
    ({}, ["someone"], "read", "token (user me) is read-only"),
    ({"create_repo": _http_error(403)}, ["someone"], "write",
     "you may not push to someone/cc (403 Forbidden)"),
    ({"upload_folder": _http_error(404, "RepositoryNotFoundError")}, ["someone"], "write",
     "cannot push to someone/cc (404 Not Found)"),
    ({"create_repo": OSError("Connection refused")}, ["someone"], "write",
     "could not push to someone/cc on the Hugging Face Hub (OSError: Connection refused)"),
])
def test_hub_refusals_are_one_line(tmp_path, fail, orgs, role, expected):
    hub = FakeHub(tmp_path / "remote", orgs=orgs, role=role, fail=fail)
    with pytest.raises(CrosscodersError) as info:
        _model().push_to_hub("someone/cc", api=hub)
    message = str(info.value)
    assert expected in message and "\n" not in message
    assert not (tmp_path / "remote").exists()
    if not fail:  # refused from whoami alone
        assert hub.names() == ["whoami"]


def test_bad_push_arguments_fail_before_the_network(tmp_path, capsys):
    _, run = _run_dir(tmp_path)
    hub = FakeHub(tmp_path / "remote")
    with pytest.raises(CrosscodersError, match="not a `crosscoders diff` output"):
        Crosscoder.load(run).push_to_hub("me/cc", diff_dir=run, api=hub)
    with pytest.raises(CrosscodersError, match="owner/name"):
        Crosscoder.load(run).push_to_hub("justaname", api=hub)
    assert hub.calls == []
    assert cli_main(["push", str(run), "me/cc", "--report", "r.html"]) == 2
    assert "--report goes with --diff" in capsys.readouterr().err


@pytest.mark.parametrize("error,expected", [
    (_http_error(404, "RepositoryNotFoundError"), "me/nothing was not found on the Hugging "
                                                  "Face Hub (404)"),
    (_http_error(401), "rejected your token (401"),
    (_http_error(404, "RevisionNotFoundError"), "has no revision 'v9'"),
])
def test_from_pretrained_errors(monkeypatch, error, expected):
    import huggingface_hub

    def failing(repo_id, allow_patterns=None, **options):
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    with pytest.raises(CrosscodersError, match=re.escape(expected)):
        Crosscoder.from_pretrained("me/nothing", revision="v9")


def test_card_without_run_metrics_or_hub_models(tmp_path):
    from huggingface_hub import ModelCard

    from crosscoders.formats.card import model_card

    model = _model("relu", names=["base", "chat"])
    card = ModelCard(str(model_card(model, "me/cc")))
    section = card.data.to_dict()["crosscoder"]
    assert [s["name"] for s in section["sources"]] == ["base", "chat"]
    assert "k" not in section and "fvu" not in section and "categories" not in section
    assert card.data.base_model is None and card.data.library_name == "crosscoders"
