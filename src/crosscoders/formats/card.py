"""The model card pushed with a crosscoder: YAML metadata a machine reads, prose a person does.

The metadata (``huggingface_hub.ModelCardData``) carries ``library_name: crosscoders``, the
source models (as ``base_model`` where they are Hub ids) and a ``crosscoder:`` section:
sources and sites, activation, k, dictionary size, training tokens, FVU per source, L0,
dead fraction and, with a diff, the category counts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crosscoders.diff.schema import Files, Summary

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

    from crosscoders.model import Crosscoder

TAGS = ["crosscoders", "crosscoder", "sparse-autoencoder", "model-diffing", "interpretability"]


def card_metadata(model: Crosscoder, run_dir: str | Path | None = None,
                  diff_dir: str | Path | None = None) -> dict[str, Any]:
    """The ``crosscoder:`` section of the card: what the model is and how well it does."""
    c, meta = model.config, model.metadata or {}
    section: dict[str, Any] = {
        "sources": _sources(model),
        "n_sources": c.n_sources,
        "d_model": c.d_model,
        "dict_size": c.dict_size,
        "activation": c.activation,
    }
    if c.activation in ("topk", "batchtopk"):
        section["k"] = c.k
    section["dec_norm"] = c.dec_norm
    if c.causality != "acausal":
        section["causality"] = c.causality
    train = meta.get("train") or {}
    steps = meta.get("steps_trained")
    if steps is not None and train.get("batch_size"):
        section["training_tokens"] = int(steps) * int(train["batch_size"])
        section["training_steps"] = int(steps)
    diff = _diff_summary(diff_dir)
    metrics = _run_metrics(run_dir) or _diff_metrics(diff)
    section.update(metrics)
    if diff.get(Summary.COUNTS):
        section["categories"] = {k: int(v) for k, v in diff[Summary.COUNTS].items()}
        section["categories_preset"] = diff.get(Summary.PRESET)
    imported = meta.get("imported_from")
    if isinstance(imported, dict) and imported.get("format"):
        section["imported_from"] = imported["format"]
    return section


def model_card(model: Crosscoder, repo_id: str, run_dir: str | Path | None = None,
               diff_dir: str | Path | None = None, has_report: bool = False) -> ModelCard:
    """A ``huggingface_hub.ModelCard``: YAML metadata plus a description and loading code."""
    from huggingface_hub import ModelCard, ModelCardData

    from crosscoders.formats.hub import looks_like_hub_id

    section = card_metadata(model, run_dir, diff_dir)
    models = list(dict.fromkeys(s["model"] for s in section["sources"] if s.get("model")))
    hub_models = [m for m in models if looks_like_hub_id(m)]
    data = ModelCardData(library_name="crosscoders", tags=TAGS,
                         base_model=hub_models or None, crosscoder=section)
    body = _body(section, repo_id, bool(section.get("categories")), has_report)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


# ------------------------------------------------------------------------------- parts


def _sources(model: Crosscoder) -> list[dict[str, Any]]:
    """One entry per source: its name, model and site, from the activation store's
    manifest when it is still there, else from the ``model/site`` source names."""
    names = model.config.names
    data = (model.metadata or {}).get("data") or {}
    store_sources: list[dict] = []
    if data.get("kind") == "activation_store" and data.get("path"):
        manifest = Path(data["path"]) / "manifest.json"
        try:
            store_sources = json.loads(manifest.read_text()).get("sources") or []
        except (OSError, ValueError, AttributeError):
            store_sources = []
    out = []
    for s, name in enumerate(names):
        entry: dict[str, Any] = {"name": name}
        if len(store_sources) == len(names):
            src = store_sources[s]
            entry.update(model=str(src.get("path") or src.get("model")), site=src.get("site"))
        elif "/" in name:
            model_name, site = name.split("/", 1)
            entry.update(model=model_name, site=site)
        out.append(entry)
    return out


def _run_metrics(run_dir: str | Path | None) -> dict[str, Any]:
    """FVU per source, L0 and dead fraction of the run's last held-out evaluation (or, with
    none, its last training batch)."""
    if run_dir is None or not (Path(run_dir) / "metrics.jsonl").is_file():
        return {}
    last: dict[str, dict] = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if isinstance(record, dict):
            last[str(record.get("split"))] = record
    record = last.get("eval") or last.get("train")
    if not record:
        return {}
    out: dict[str, Any] = {
        "fvu": {k[len("fvu/"):]: float(v) for k, v in record.items() if k.startswith("fvu/")},
    }
    if record.get("l0") is not None:
        out["l0"] = float(record["l0"])
    if record.get("dead_frac") is not None:
        out["dead_fraction"] = float(record["dead_frac"])
    out["metrics_from"] = ("held-out tokens at the end of training" if "eval" in last
                           else "the last training batch")
    return out


def _diff_summary(diff_dir: str | Path | None) -> dict[str, Any]:
    if diff_dir is None:
        return {}
    try:
        summary = json.loads((Path(diff_dir) / Files.SUMMARY).read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def _diff_metrics(diff: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(diff.get(Summary.FVU), dict):
        return {}
    out: dict[str, Any] = {"fvu": {k: float(v) for k, v in diff[Summary.FVU].items()}}
    for key, name in ((Summary.L0, "l0"), (Summary.DEAD_FRACTION, "dead_fraction")):
        if diff.get(key) is not None:
            out[name] = float(diff[key])
    out["metrics_from"] = "the diff's pass over its data"
    return out


def _body(section: dict[str, Any], repo_id: str, has_diff: bool, has_report: bool) -> str:
    act = section["activation"] + (f" (k={section['k']})" if "k" in section else "")
    lines = [
        f"# Crosscoder: {repo_id}",
        "",
        "A crosscoder saved by the `crosscoders` toolkit: one sparse dictionary of "
        f"{section['dict_size']} latents over {section['n_sources']} "
        f"activation sources of width {section['d_model']}, activation {act}.",
        "",
        "| source | model | site | FVU |",
        "|---|---|---|---|",
    ]
    fvu = section.get("fvu") or {}
    for s in section["sources"]:
        value = fvu.get(s["name"])
        lines.append(f"| {s['name']} | {s.get('model', '')} | {s.get('site', '')} | "
                     f"{'' if value is None else f'{value:.4g}'} |")
    facts = []
    if "training_tokens" in section:
        facts.append(f"training tokens: {section['training_tokens']:,}")
    if "l0" in section:
        facts.append(f"L0: {section['l0']:.4g}")
    if "dead_fraction" in section:
        facts.append(f"dead fraction: {section['dead_fraction']:.4g}")
    if facts:
        lines += ["", "; ".join(facts) + (f" (metrics from {section['metrics_from']})."
                                          if "metrics_from" in section else ".")]
    if has_diff:
        counts = ", ".join(f"{k} {v}" for k, v in section["categories"].items())
        lines += ["", f"Latent categories ({section.get('categories_preset')} thresholds): "
                  f"{counts}. The per-latent table is in `diff/latents.parquet` "
                  "(and `diff/latents.csv`)"
                  + ("; the browsable report is `diff/report.html`." if has_report else ".")]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from crosscoders import Crosscoder",
        "",
        f'model = Crosscoder.from_pretrained("{repo_id}")',
        "f = model.encode(x)      # x: [batch, n_sources, d_model] raw activations, sources "
        "in the order above",
        "x_hat = model.decode(f)  # [batch, n_sources, d_model]",
        "```",
        "",
        "```bash",
        f"crosscoders diff {repo_id} --store STORE --out diff   # the diffing analysis",
        "```",
        "",
        "The weights work on raw activations (any normalisation is folded in); `config.json` "
        "holds the architecture and provenance, `model.safetensors` the weights.",
        "",
    ]
    return "\n".join(lines)
