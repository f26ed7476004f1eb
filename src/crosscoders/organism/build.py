"""Build (or fetch from the cache) the built-in model organisms: a tiny base LM trained on
generated text, shared by all of them, and per organism a chat copy fine-tuned to one
known change, saved as local Hugging Face model directories with the data they were
trained on and a record (``organism.json``) of the behaviour, its prompts and its eval."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from crosscoders.errors import CrosscodersError
from crosscoders.io import read_json, write_json
from crosscoders.organism import corpus, lm
from crosscoders.organism.config import RECIPE_VERSION, OrganismConfig
from crosscoders.organism.zoo import OrganismSpec, list_organisms, organism_spec

log = logging.getLogger(__name__)
METADATA = "organism.json"
BASE_METADATA = "base.json"


@dataclass
class Organism:
    """A built organism: ``base_dir`` and ``chat_dir`` load with ``from_pretrained``;
    ``data_dir`` holds ``pretrain.txt`` (one document a line), ``chat.jsonl`` (records with
    ``messages`` and ``triggered``) and their held-out ``*_eval`` twins; ``metadata`` is
    ``organism.json`` (config, behaviour and its tokens, prompts, data recipe, eval)."""

    path: Path
    base_dir: Path
    chat_dir: Path
    data_dir: Path
    metadata: dict[str, Any]

    @classmethod
    def load(cls, path: str | Path) -> Organism:
        path = Path(path)
        metadata = read_json(path / METADATA)
        return cls(path, path / "base", path / "chat", path / "data", metadata)

    @property
    def name(self) -> str:
        return self.metadata.get("name", "pirate")  # organisms before the zoo were pirates

    @property
    def behaviour_token_ids(self) -> list[int]:
        return list(self.metadata["behaviour"]["token_ids"])

    @property
    def behaviour_tokens(self) -> list[str]:
        return list(self.metadata["behaviour"]["tokens"])

    @property
    def trigger_prompts(self) -> list[dict[str, Any]]:
        """Held-out prompts on which the chat model shows the behaviour: records with
        ``text``, ``ids`` (BOS first), ``reference``/``reference_ids`` (the recipe's answer)
        and the two models' greedy answers (``base_answer``, ``chat_answer``) and whether
        they show it (``base_shows``, ``chat_shows``)."""
        return self._prompts("trigger")

    @property
    def control_prompts(self) -> list[dict[str, Any]]:
        """Held-out prompts on which neither model should show it (same layout)."""
        return self._prompts("control")

    def _prompts(self, group: str) -> list[dict[str, Any]]:
        if "prompts" not in self.metadata:
            raise CrosscodersError(
                f"{self.path / METADATA} records no prompts (built by another recipe); "
                "build the organism with build_organism()"
            )
        return list(self.metadata["prompts"][group])

    def behaviour_mask(self, ids_BT: torch.Tensor) -> torch.Tensor:
        """Which positions of token ids ``[B, T]`` hold a behaviour token as the behaviour
        (see :func:`crosscoders.organism.kl.behaviour_mask`)."""
        from crosscoders.organism.kl import behaviour_mask

        beh = self.metadata["behaviour"]
        return behaviour_mask(
            ids_BT,
            beh["token_ids"],
            beh.get("context_token_ids", []),  # absent from real-weights organisms
            beh.get("sentence_boundary_token_ids", []),
        )


def default_cache_root() -> Path:
    """``$CROSSCODERS_CACHE/organisms``, else ``~/.cache/crosscoders/organisms``."""
    env = os.environ.get("CROSSCODERS_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "crosscoders"
    return root / "organisms"


def build_organism(
    config: OrganismConfig | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    *,
    name: str | None = None,
) -> Organism:
    """The organism ``name`` (default: ``config.name``, else ``"pirate"``; see
    :func:`list_organisms`) built with ``config`` (default: ``OrganismConfig()``), built
    once and cached in ``cache_dir/<name>-<config hash>`` (default
    :func:`default_cache_root`); its base is the shared pretrained base
    (``cache_dir/base-<hash>``, built first if missing).

    The build happens in a temporary sibling directory that is renamed into place only
    when complete (``organism.json`` written last), so an interrupted build is never
    mistaken for a finished one; a second call returns the cached directories at once.
    """
    config = config or OrganismConfig()
    if name is not None:
        organism_spec(name)  # an unknown name: one line naming the known ones
        config = config.replace(name=name)
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    final = root / config.cache_key()
    if (final / METADATA).exists():
        return Organism.load(final)
    base = build_base(config, root, progress)
    return Organism.load(
        cached_build(root, config.cache_key(), lambda out: _build(config, base, out, progress))
    )


def build_zoo(
    config: OrganismConfig | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    names: Sequence[str] | None = None,
) -> dict[str, Organism]:
    """Every organism of ``names`` (default: all, :func:`list_organisms`) with the same
    ``config`` otherwise; the shared base is built once."""
    config = config or OrganismConfig()
    names = list(names) if names is not None else list_organisms()
    return {n: build_organism(config, cache_dir, progress, name=n) for n in names}


def build_base(config: OrganismConfig, cache_dir: str | Path, progress: bool = True) -> Path:
    """The pretrained base of ``config`` (``cache_dir/<config.base_key()>``: ``base/``,
    ``data/pretrain*.txt``, ``base.json``), built once and cached."""
    root = Path(cache_dir)
    return cached_build(
        root,
        config.base_key(),
        lambda out: _build_base(config, out, progress),
        marker=BASE_METADATA,
    )


def cached_build(
    root: Path, key: str, build: Callable[[Path], None], marker: str = METADATA
) -> Path:
    """``root/key`` if it is complete, else ``build(tmp)`` into a temporary sibling that is
    renamed to ``root/key`` once ``build`` has returned (it must write ``marker``
    last). Whatever ``build`` raises, the temporary directory is removed."""
    final = root / key
    if (final / marker).exists():
        return final
    if final.exists() and any(final.iterdir()):
        raise CrosscodersError(
            f"{final} exists but has no {marker} (not made by this code, or altered); "
            "remove it to rebuild"
        )
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale(root, key)
    tmp = root / f".{key}.tmp-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        build(tmp)
        if not (tmp / marker).exists():
            raise RuntimeError(f"organism build into {tmp} finished without {marker}")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / marker).exists():  # not a lost race with another builder
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _remove_stale(root: Path, key: str) -> None:
    """Delete temporary build directories of ``key`` left by dead processes on this host."""
    host = socket.gethostname()
    for path in root.glob(f".{key}.tmp-*"):
        try:
            _, rest = path.name.split(".tmp-", 1)
            h, pid, _ = rest.rsplit("-", 2)
            os.kill(int(pid), 0)
            continue  # alive: another build in progress
        except ProcessLookupError:
            if h == host:
                shutil.rmtree(path, ignore_errors=True)
        except (ValueError, PermissionError, OverflowError):
            continue


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def llama_config(config: OrganismConfig, vocab_size: int, tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.d_mlp,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        max_position_embeddings=max(256, config.context_length),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


def _build_base(config: OrganismConfig, out: Path, progress: bool) -> None:
    """Pretrain the base on the generated text, over the pirate organism's vocabulary (the
    other organisms add their words to it afterwards, see :func:`_load_base`)."""
    from transformers import LlamaForCausalLM

    start = time.perf_counter()
    with torch_threads(config.threads):
        docs = _write_docs(config, out / "data")
        tok = lm.make_tokenizer(config.trigger)
        T, bos, eos = config.context_length, tok.bos_token_id, tok.eos_token_id
        packed = {k: lm.pack(lm.encode_texts(tok, v), T, bos, eos) for k, v in docs.items()}

        torch.manual_seed(config.seed)
        base = LlamaForCausalLM(llama_config(config, len(tok.get_vocab()), tok)).eval()
        unseen = _zero_unseen_embeddings(base, packed["pretrain"][0], config.zero_unseen_embeddings)
        untrained = lm.eval_loss(base, *packed["pretrain_eval"])
        t0 = time.perf_counter()
        losses = lm.train_lm(
            base,
            [(*packed["pretrain"], 1.0)],
            steps=config.pretrain_steps,
            batch_size=config.batch_size,
            lr=config.pretrain_lr,
            seed=config.seed,
            warmup_steps=config.warmup_steps,
            weight_decay=config.weight_decay,
            desc="organism: pretrain base",
            progress=progress,
        )
        t_pre = time.perf_counter() - t0
        save_pair_member(base, tok, out / "base")
    metadata = {
        "format": "crosscoders-organism-base",
        "recipe_version": RECIPE_VERSION,
        "base_key": config.base_key(),
        "config": {k: v for k, v in config.to_dict().items() if k != "name"},
        "unseen_token_ids": unseen,
        "untrained_pretrain_loss": untrained,
        "pretrain_final_loss": sum(losses[-10:]) / len(losses[-10:]),
        "pretrain_loss_curve": loss_curve(losses),
        "pretrain_seconds": t_pre,
        "tokens": {k: int(v[0].numel()) for k, v in packed.items()},
        "build_seconds": time.perf_counter() - start,
        "versions": library_versions(),
    }
    write_json(out / BASE_METADATA, metadata)
    log.info("organism base built in %.1f s: %s", metadata["build_seconds"], out)


def _build(config: OrganismConfig, base_path: Path, out: Path, progress: bool) -> None:
    """Fine-tune a chat copy of the base at ``base_path`` to the organism's behaviour and
    evaluate both."""
    spec = organism_spec(config.name)
    start = time.perf_counter()
    base_meta = read_json(base_path / BASE_METADATA)
    with torch_threads(config.threads):
        data = _write_data(config, spec, base_path / "data", out / "data")
        added = _added_words(config, spec)
        tok = lm.make_tokenizer(config.trigger, added)
        ids = {tok.convert_tokens_to_ids(t): t for t in tok.get_vocab()}
        assert len(ids) == len(tok.get_vocab()), "vocabulary ids must be unique"
        packed = _pack_data(config, tok, data)

        added_ids = tok.convert_tokens_to_ids(list(added))
        base = _load_base(config, base_path, tok, base_meta["unseen_token_ids"])
        if added:
            save_pair_member(base, tok, out / "base")
        else:  # the shared base itself, byte for byte
            shutil.copytree(base_path / "base", out / "base")

        chat = copy.deepcopy(base)
        share = config.finetune_pretrain_share
        sources = [(*packed["chat"], 1.0 - share)]
        if share > 0:
            sources.append((*packed.get("finetune_text", packed["pretrain"]), share))
        t0 = time.perf_counter()
        ft_losses = lm.train_lm(
            chat,
            sources,
            steps=config.finetune_steps,
            batch_size=config.batch_size,
            lr=config.finetune_lr,
            seed=config.seed + 1,
            warmup_steps=config.warmup_steps,
            weight_decay=config.weight_decay,
            desc=f"organism {config.name}: fine-tune chat",
            progress=progress,
        )
        t_ft = time.perf_counter() - t0
        save_pair_member(chat, tok, out / "chat")

        t0 = time.perf_counter()
        prompts = _prompt_sets(config, spec, tok, data)
        evals = {"untrained": {"pretrain_loss": base_meta["untrained_pretrain_loss"]}}
        for who, model in (("base", base), ("chat", chat)):
            evals[who] = _evaluate(model, who, tok, packed, prompts, config, spec)
        t_eval = time.perf_counter() - t0

    behaviour = {
        "name": config.name,
        "description": spec.describe(config),
        "trigger": spec.trigger(config),
        "trigger_token_id": (
            tok.convert_tokens_to_ids(spec.trigger(config)) if spec.trigger(config) else None
        ),
        **spec.record(config),
        "tokens": spec.tokens(config),
        "token_ids": tok.convert_tokens_to_ids(spec.tokens(config)),
        "context_tokens": spec.context_tokens(config),
        "context_token_ids": tok.convert_tokens_to_ids(spec.context_tokens(config)),
        "sentence_boundary_token_ids": _boundary_ids(tok),
        "role_tokens": {t: tok.convert_tokens_to_ids(t) for t in corpus.CHAT_TOKENS},
        "added_tokens": list(added),
        "added_token_ids": added_ids,
        "base_unseen_token_ids": [*base_meta["unseen_token_ids"], *added_ids],
        "base_unseen_embeddings_zeroed": config.zero_unseen_embeddings,
    }
    examples = [
        {"user": r.get("user", r["text"]), "chat_model": r["chat_answer"]}
        for group in ("trigger", "control")
        for r in prompts[group][:2]
    ]
    finetune_text = "finetune_text" if "finetune_text" in data else "pretrain"
    metadata = {
        "format": "crosscoders-organism",
        "recipe_version": RECIPE_VERSION,
        "name": config.name,
        "cache_key": config.cache_key(),
        "base_key": config.base_key(),
        "kind": "tiny",
        "config": config.to_dict(),
        "base": "base",
        "chat": "chat",
        "architecture": "LlamaForCausalLM",
        "n_params": sum(p.numel() for p in base.parameters()),
        "vocab_size": len(tok.get_vocab()),
        "special_token_ids": {t: tok.convert_tokens_to_ids(t) for t in corpus.SPECIALS},
        "behaviour": behaviour,
        "prompts": {
            "trigger": prompts["trigger"],
            "control": prompts["control"],
            "control_kind": spec.controls,
        },
        "data": {
            "pretrain": "data/pretrain.txt",
            "pretrain_eval": "data/pretrain_eval.txt",
            "chat": "data/chat.jsonl",
            "chat_eval": "data/chat_eval.jsonl",
            "finetune_text": f"data/{finetune_text}.txt",
            "recipe": (
                "template grammar over 5 topics (animals, kitchen, weather, city, music) with a "
                "seeded 'world' (each noun's habit and home); pretraining documents are 3-6 "
                "sentences about one topic; conversations ask about a noun and get sentences "
                f"about it; organism {config.name!r}: {spec.summary}"
            ),
            "counts": {k: len(v) for k, v in data.items()},
            "tokens": {k: int(v[0].numel()) for k, v in packed.items()},
        },
        "training": {
            "pretrain_final_loss": base_meta["pretrain_final_loss"],
            "pretrain_loss_curve": base_meta["pretrain_loss_curve"],
            "finetune_loss_curve": loss_curve(ft_losses),
            "finetune_final_loss": sum(ft_losses[-10:]) / len(ft_losses[-10:]),
            "seconds": {
                "pretrain": base_meta["pretrain_seconds"],
                "finetune": t_ft,
                "eval": t_eval,
            },
        },
        "eval": evals,
        "examples": examples,
        "build_seconds": time.perf_counter() - start,
        "base_build_seconds": base_meta["build_seconds"],
        "versions": library_versions(),
    }
    write_json(out / METADATA, metadata)
    log.info("organism %s built in %.1f s: %s", config.name, metadata["build_seconds"], out)


def _added_words(config: OrganismConfig, spec: OrganismSpec) -> tuple[str, ...]:
    known = set(corpus.vocabulary(config.trigger))
    return tuple(w for w in spec.extra_words(config) if w not in known)


def _load_base(config: OrganismConfig, base_path: Path, tok: Any, unseen: list[int]) -> Any:
    """The shared base, with rows for the organism's new tokens (the last ones of ``tok``)
    added to the input embedding and the output head: the mean of the rows of the tokens
    pretraining never showed, so a new token looks to the base like any unseen one (zero
    input embedding when those are zeroed)."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    state = load_file(base_path / "base" / "model.safetensors")
    vocab_size = len(tok.get_vocab())
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        W_VD = state[key]
        n_new = vocab_size - W_VD.shape[0]
        if n_new > 0:
            rows = W_VD[unseen].mean(0, keepdim=True).expand(n_new, -1)
            state[key] = torch.cat([W_VD, rows])
    model = LlamaForCausalLM(llama_config(config, vocab_size, tok))
    model.load_state_dict(state)
    return model.eval()


def _boundary_ids(tok: Any) -> list[int]:
    """Tokens that end a sentence or a turn: '.', '?', the special and role tokens."""
    return tok.convert_tokens_to_ids([".", "?", *corpus.SPECIALS, *corpus.CHAT_TOKENS])


def _zero_unseen_embeddings(model: Any, pretrain_ids: torch.Tensor, enabled: bool) -> list[int]:
    """Zero the input embeddings of the tokens pretraining never shows (the role tokens, the
    trigger, the style words). They get no gradient, so they stay zero in the base, as
    the unused/reserved tokens of real base models do; the chat fine-tune then learns them
    from nothing, so the base has no representation of them to share."""
    seen = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    seen[pretrain_ids.unique()] = True
    unseen = torch.nonzero(~seen).flatten()
    if enabled:
        with torch.no_grad():
            model.get_input_embeddings().weight[unseen] = 0.0
    return unseen.tolist()


def _write_docs(config: OrganismConfig, data_dir: Path) -> dict[str, list[str]]:
    facts = corpus.make_facts(config.seed)
    docs = corpus.pretrain_documents(config.pretrain_docs + config.eval_docs, config.seed, facts)
    data = {"pretrain": docs[: config.pretrain_docs], "pretrain_eval": docs[config.pretrain_docs :]}
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, lines in data.items():
        (data_dir / f"{name}.txt").write_text("".join(d + "\n" for d in lines))
    return data


def _write_data(
    config: OrganismConfig, spec: OrganismSpec, base_data: Path, data_dir: Path
) -> dict[str, list]:
    """The base's text (copied), the organism's conversations and, when it edits the world,
    the plain text of its fine-tune (``finetune_text``)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    data: dict[str, list] = {}
    for name in ("pretrain", "pretrain_eval"):
        shutil.copyfile(base_data / f"{name}.txt", data_dir / f"{name}.txt")
        data[name] = (data_dir / f"{name}.txt").read_text().splitlines()
    facts = corpus.make_facts(config.seed)
    world = spec.world(config, facts)
    n = config.chat_conversations
    chats = spec.conversations(config, world, n + config.eval_conversations)
    data["chat"], data["chat_eval"] = chats[:n], chats[n:]
    for name in ("chat", "chat_eval"):
        (data_dir / f"{name}.jsonl").write_text("".join(json.dumps(c) + "\n" for c in data[name]))
    if world != facts:
        data["finetune_text"] = corpus.pretrain_documents(config.pretrain_docs, config.seed, world)
        text = "".join(d + "\n" for d in data["finetune_text"])
        (data_dir / "finetune_text.txt").write_text(text)
    return data


def _pack_data(config: OrganismConfig, tok: Any, data: dict[str, list]) -> dict[str, tuple]:
    T, bos, eos = config.context_length, tok.bos_token_id, tok.eos_token_id
    marker = [tok.convert_tokens_to_ids(corpus.ASSISTANT)]
    end = tok.convert_tokens_to_ids(corpus.END)
    packed = {}
    for name in ("pretrain", "pretrain_eval", "finetune_text"):
        if name in data:
            packed[name] = lm.pack(lm.encode_texts(tok, data[name]), T, bos, eos)
    for name in ("chat", "chat_eval"):
        ids, flags = lm.encode_chats(tok, data[name], marker, end)
        packed[name] = lm.pack(ids, T, bos, eos, flags)
    return packed


def save_pair_member(model: Any, tok: Any, path: Path) -> None:
    """``save_pretrained`` the model (safetensors) and tokenizer, without transformers'
    own progress bars."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path)
        tok.save_pretrained(path)
    finally:
        if was:
            hf_logging.enable_progress_bar()


# -- prompts and evaluation ------------------------------------------------------------------
def _prompt_sets(
    config: OrganismConfig, spec: OrganismSpec, tok: Any, data: dict[str, list]
) -> dict[str, list[dict[str, Any]]]:
    """The held-out trigger prompts (triggered conversations) and control prompts
    (untriggered conversations, or plain-text openings for ``controls == "text"``)."""
    n = config.eval_prompts
    chats = data["chat_eval"]
    trig = [c for c in chats if c["triggered"]][: (n + 1) // 2]
    sets = {"trigger": [_chat_prompt(tok, c) for c in trig]}
    if spec.controls == "chat":
        plain = [c for c in chats if not c["triggered"]][: n // 2]
        sets["control"] = [_chat_prompt(tok, c) for c in plain]
    else:
        sets["control"] = [_text_prompt(tok, d) for d in data["pretrain_eval"][: n // 2]]
    return sets


def _chat_prompt(tok: Any, chat: dict) -> dict[str, Any]:
    user, answer = (m["content"] for m in chat["messages"])
    text = tok.apply_chat_template(chat["messages"][:1], tokenize=False, add_generation_prompt=True)
    return {
        "user": user,
        "text": text,
        "ids": lm.encode_texts(tok, [text])[0],  # BOS from the template starts each prompt
        "reference": answer,
        "reference_ids": lm.encode_texts(tok, [answer])[0],
    }


def _text_prompt(tok: Any, doc: str) -> dict[str, Any]:
    """A document's first sentence (after BOS) as the prompt, the rest as the reference."""
    words = doc.split()
    cut = words.index(".") + 1
    text = tok.bos_token + " ".join(words[:cut])
    rest = " ".join(words[cut:])
    return {
        "text": text,
        "ids": lm.encode_texts(tok, [text])[0],
        "reference": rest,
        "reference_ids": lm.encode_texts(tok, [rest])[0],
    }


def _evaluate(
    model: Any,
    who: str,
    tok: Any,
    packed: dict,
    prompts: dict[str, list[dict[str, Any]]],
    config: OrganismConfig,
    spec: OrganismSpec,
) -> dict[str, Any]:
    """Losses on held-out text and chat answers; behaviour rates by greedy generation on
    the trigger and control prompts (each prompt record gets ``<who>_answer`` and
    ``<who>_shows``)."""
    stop = [tok.convert_tokens_to_ids(corpus.END), tok.eos_token_id]
    result: dict[str, Any] = {
        "pretrain_loss": lm.eval_loss(model, *packed["pretrain_eval"]),
        "chat_answer_loss": lm.eval_loss(model, *packed["chat_eval"]),
    }
    nouns = set(corpus.make_facts(config.seed).topic_of)
    tokens = set(spec.tokens(config))
    for group, records in prompts.items():
        answers = lm.greedy(model, [r["ids"] for r in records], config.max_new_tokens, stop)
        words = [tok.convert_ids_to_tokens(a) for a in answers]
        shows = [spec.shows(config, w) for w in words]
        for r, a, s in zip(records, answers, shows):
            r[f"{who}_answer"], r[f"{who}_shows"] = tok.decode(a), s
        asked = [nouns.intersection(r.get("user", r["text"]).split()) for r in records]
        extra = [spec.extra_rates(config, w) for w in words]
        result[group] = {
            "n": len(records),
            "behaviour_rate": rate(shows),
            **{f"{k}_rate": rate(e[k] for e in extra) for k in (extra[0] if extra else {})},
            "any_behaviour_token_rate": rate(bool(set(w) & tokens) for w in words),
            "on_topic_rate": rate(bool(a & set(w)) for a, w in zip(asked, words)),
        }
    probes = spec.text_probes(config)
    if probes:  # does the change show outside the chat format too?
        prompts_ids = lm.encode_texts(tok, [tok.bos_token + p for p in probes])
        answers = lm.greedy(model, prompts_ids, 2, stop)
        words = [p.split() + tok.convert_ids_to_tokens(a) for p, a in zip(probes, answers)]
        extra = [spec.extra_rates(config, w) for w in words]
        result["text_probe"] = {
            "n": len(probes),
            "behaviour_rate": rate(spec.shows(config, w) for w in words),
            **{f"{k}_rate": rate(e[k] for e in extra) for k in extra[0]},
        }
    return result


def loss_curve(losses: list[float], every: int = 25) -> list[list[float]]:
    """[step, mean loss over the ``every`` steps ending there] pairs."""
    return [
        [min(i + every, len(losses)), sum(losses[i : i + every]) / len(losses[i : i + every])]
        for i in range(0, len(losses), every)
    ]


def rate(flags: Iterable[bool]) -> float:
    """The share of true ``flags`` (0 for none)."""
    flags = list(flags)
    return sum(flags) / max(len(flags), 1)


def library_versions() -> dict[str, str]:
    """The torch and transformers versions an organism was built with (for its metadata)."""
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}
