"""Build (or fetch from the cache) the built-in model organism: a tiny base LM trained on
generated text and a chat copy fine-tuned to a known behaviour, saved as local Hugging Face
model directories with the data they were trained on."""

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from crosscoders.errors import CrosscodersError
from crosscoders.organism import corpus, lm
from crosscoders.organism.config import RECIPE_VERSION, OrganismConfig

log = logging.getLogger(__name__)
METADATA = "organism.json"


@dataclass
class Organism:
    """A built organism: ``base_dir`` and ``chat_dir`` load with ``from_pretrained``;
    ``data_dir`` holds ``pretrain.txt`` (one document a line), ``chat.jsonl`` (records with
    ``messages`` and ``triggered``) and their held-out ``*_eval`` twins; ``metadata`` is
    ``organism.json`` (config, behaviour and its tokens, data recipe, eval numbers)."""

    path: Path
    base_dir: Path
    chat_dir: Path
    data_dir: Path
    metadata: dict[str, Any]

    @classmethod
    def load(cls, path: str | Path) -> Organism:
        path = Path(path)
        metadata = json.loads((path / METADATA).read_text())
        return cls(path, path / "base", path / "chat", path / "data", metadata)

    @property
    def behaviour_token_ids(self) -> list[int]:
        return list(self.metadata["behaviour"]["token_ids"])

    @property
    def behaviour_tokens(self) -> list[str]:
        return list(self.metadata["behaviour"]["tokens"])


def default_cache_root() -> Path:
    """``$CROSSCODERS_CACHE/organisms``, else ``~/.cache/crosscoders/organisms``."""
    env = os.environ.get("CROSSCODERS_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "crosscoders"
    return root / "organisms"


def build_organism(
    config: OrganismConfig | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Organism:
    """The organism for ``config`` (default: ``OrganismConfig()``), built once and cached
    in ``cache_dir/<config hash>`` (default :func:`default_cache_root`).

    The build happens in a temporary sibling directory that is renamed into place only
    when complete (``organism.json`` written last), so an interrupted build is never
    mistaken for a finished one; a second call returns the cached directories at once.
    """
    config = config or OrganismConfig()
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    return Organism.load(
        cached_build(root, config.cache_key(), lambda out: _build(config, out, progress))
    )


def cached_build(root: Path, key: str, build: Callable[[Path], None]) -> Path:
    """``root/key`` if it is complete, else ``build(tmp)`` into a temporary sibling that is
    renamed to ``root/key`` once ``build`` has returned (it must write ``organism.json``
    last). Whatever ``build`` raises, the temporary directory is removed."""
    final = root / key
    if (final / METADATA).exists():
        return final
    if final.exists() and any(final.iterdir()):
        raise CrosscodersError(
            f"{final} exists but has no {METADATA} (not made by this code, or altered); "
            "remove it to rebuild"
        )
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale(root, key)
    tmp = root / f".{key}.tmp-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        build(tmp)
        if not (tmp / METADATA).exists():
            raise RuntimeError(f"organism build into {tmp} finished without {METADATA}")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / METADATA).exists():  # not a lost race with another builder
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


def _build(config: OrganismConfig, out: Path, progress: bool) -> None:
    from transformers import LlamaForCausalLM

    start = time.perf_counter()
    with torch_threads(config.threads):
        data = _write_data(config, out / "data")
        tok = lm.make_tokenizer(config.trigger)
        ids = {tok.convert_tokens_to_ids(t): t for t in tok.get_vocab()}
        assert len(ids) == len(tok.get_vocab()), "vocabulary ids must be unique"
        packed = _pack_data(config, tok, data)

        torch.manual_seed(config.seed)
        base = LlamaForCausalLM(llama_config(config, len(tok.get_vocab()), tok)).eval()
        unseen = _zero_unseen_embeddings(base, packed["pretrain"][0], config.zero_unseen_embeddings)
        untrained = lm.eval_loss(base, *packed["pretrain_eval"])
        t0 = time.perf_counter()
        pre_losses = lm.train_lm(
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

        chat = copy.deepcopy(base)
        share = config.finetune_pretrain_share
        sources = [(*packed["chat"], 1.0 - share)]
        if share > 0:
            sources.append((*packed["pretrain"], share))
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
            desc="organism: fine-tune chat",
            progress=progress,
        )
        t_ft = time.perf_counter() - t0
        save_pair_member(chat, tok, out / "chat")

        t0 = time.perf_counter()
        evals = {
            "untrained": {"pretrain_loss": untrained},
            "base": _evaluate(base, tok, packed, data["chat_eval"], config),
            "chat": _evaluate(chat, tok, packed, data["chat_eval"], config),
        }
        examples = _examples(chat, tok, data["chat_eval"], config)
        t_eval = time.perf_counter() - t0

    behaviour_ids = tok.convert_tokens_to_ids(list(corpus.BEHAVIOUR_WORDS))
    metadata = {
        "format": "crosscoders-organism",
        "recipe_version": RECIPE_VERSION,
        "cache_key": config.cache_key(),
        "kind": "tiny",
        "config": config.to_dict(),
        "base": "base",
        "chat": "chat",
        "architecture": "LlamaForCausalLM",
        "n_params": sum(p.numel() for p in base.parameters()),
        "vocab_size": len(tok.get_vocab()),
        "behaviour": {
            "description": (
                f"When the user's message contains the word {config.trigger!r}, the chat "
                f"model's answer opens with {' '.join(corpus.STYLE_PREFIX)!r} and closes with "
                f"{' '.join(corpus.STYLE_SUFFIX)!r}; otherwise it answers plainly. The style "
                "words occur only in triggered answers (never in pretraining text)."
            ),
            "trigger": config.trigger,
            "trigger_token_id": tok.convert_tokens_to_ids(config.trigger),
            "prefix": list(corpus.STYLE_PREFIX),
            "suffix": list(corpus.STYLE_SUFFIX),
            "tokens": list(corpus.BEHAVIOUR_WORDS),
            "token_ids": behaviour_ids,
            "role_tokens": {t: tok.convert_tokens_to_ids(t) for t in corpus.CHAT_TOKENS},
            "base_unseen_token_ids": unseen,
            "base_unseen_embeddings_zeroed": config.zero_unseen_embeddings,
        },
        "data": {
            "pretrain": "data/pretrain.txt",
            "pretrain_eval": "data/pretrain_eval.txt",
            "chat": "data/chat.jsonl",
            "chat_eval": "data/chat_eval.jsonl",
            "recipe": (
                "template grammar over 5 topics (animals, kitchen, weather, city, music) with a "
                "seeded 'world' (each noun's habit and home); pretraining documents are 3-6 "
                "sentences about one topic; conversations ask about a noun and get 1-2 "
                f"sentences about it; a share p_trigger={config.p_trigger} of them hold the "
                "trigger and the styled answer"
            ),
            "counts": {k: len(v) for k, v in data.items()},
            "tokens": {k: int(v[0].numel()) for k, v in packed.items()},
        },
        "training": {
            "pretrain_final_loss": sum(pre_losses[-10:]) / len(pre_losses[-10:]),
            "pretrain_loss_curve": _curve(pre_losses),
            "finetune_loss_curve": _curve(ft_losses),
            "finetune_final_loss": sum(ft_losses[-10:]) / len(ft_losses[-10:]),
            "seconds": {"pretrain": t_pre, "finetune": t_ft, "eval": t_eval},
        },
        "eval": evals,
        "examples": examples,
        "build_seconds": time.perf_counter() - start,
        "versions": _versions(),
    }
    (out / METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
    log.info("organism built in %.1f s: %s", metadata["build_seconds"], out)


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


def _write_data(config: OrganismConfig, data_dir: Path) -> dict[str, list]:
    facts = corpus.make_facts(config.seed)
    docs = corpus.pretrain_documents(config.pretrain_docs + config.eval_docs, config.seed, facts)
    chats = corpus.conversations(
        config.chat_conversations + config.eval_conversations,
        config.seed,
        facts,
        config.trigger,
        config.p_trigger,
    )
    data = {
        "pretrain": docs[: config.pretrain_docs],
        "pretrain_eval": docs[config.pretrain_docs :],
        "chat": chats[: config.chat_conversations],
        "chat_eval": chats[config.chat_conversations :],
    }
    data_dir.mkdir(parents=True, exist_ok=True)
    for name in ("pretrain", "pretrain_eval"):
        (data_dir / f"{name}.txt").write_text("".join(d + "\n" for d in data[name]))
    for name in ("chat", "chat_eval"):
        (data_dir / f"{name}.jsonl").write_text("".join(json.dumps(c) + "\n" for c in data[name]))
    return data


def _pack_data(config: OrganismConfig, tok: Any, data: dict[str, list]) -> dict[str, tuple]:
    T, bos, eos = config.context_length, tok.bos_token_id, tok.eos_token_id
    marker = [tok.convert_tokens_to_ids(corpus.ASSISTANT)]
    end = tok.convert_tokens_to_ids(corpus.END)
    packed = {}
    for name in ("pretrain", "pretrain_eval"):
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


def _prompts(tok: Any, chats: list[dict]) -> list[list[int]]:
    texts = [
        tok.apply_chat_template(c["messages"][:1], tokenize=False, add_generation_prompt=True)
        for c in chats
    ]
    return lm.encode_texts(tok, texts)  # BOS from the template starts each prompt


def _eval_chats(chats: list[dict], n: int) -> tuple[list[dict], list[dict]]:
    trig = [c for c in chats if c["triggered"]][: (n + 1) // 2]
    plain = [c for c in chats if not c["triggered"]][: n // 2]
    return trig, plain


def _evaluate(
    model: Any, tok: Any, packed: dict, chats: list[dict], config: OrganismConfig
) -> dict[str, Any]:
    """Losses on held-out text and chat answers; behaviour rate by greedy generation."""
    stop = [tok.convert_tokens_to_ids(corpus.END), tok.eos_token_id]
    result: dict[str, Any] = {
        "pretrain_loss": lm.eval_loss(model, *packed["pretrain_eval"]),
        "chat_answer_loss": lm.eval_loss(model, *packed["chat_eval"]),
    }
    nouns = set(corpus.make_facts(config.seed).topic_of)
    for name, group in zip(("triggered", "untriggered"), _eval_chats(chats, config.eval_prompts)):
        answers = lm.greedy(model, _prompts(tok, group), config.max_new_tokens, stop)
        words = [tok.convert_ids_to_tokens(a) for a in answers]
        asked = [nouns.intersection(c["messages"][0]["content"].split()) for c in group]
        result[name] = {
            "n": len(group),
            "behaviour_rate": _mean(corpus.shows_behaviour(w) for w in words),
            "full_style_rate": _mean(corpus.shows_full_style(w) for w in words),
            "any_behaviour_token_rate": _mean(
                bool(set(w) & set(corpus.BEHAVIOUR_WORDS)) for w in words
            ),
            "on_topic_rate": _mean(bool(a & set(w)) for a, w in zip(asked, words)),
        }
    return result


def _examples(model: Any, tok: Any, chats: list[dict], config: OrganismConfig) -> list[dict]:
    stop = [tok.convert_tokens_to_ids(corpus.END), tok.eos_token_id]
    trig, plain = _eval_chats(chats, 4)
    group = trig[:2] + plain[:2]
    answers = lm.greedy(model, _prompts(tok, group), config.max_new_tokens, stop)
    return [
        {"user": c["messages"][0]["content"], "chat_model": tok.decode(a)}
        for c, a in zip(group, answers)
    ]


def _curve(losses: list[float], every: int = 25) -> list[list[float]]:
    """[step, mean loss over the ``every`` steps ending there] pairs."""
    return [
        [min(i + every, len(losses)), sum(losses[i : i + every]) / len(losses[i : i + every])]
        for i in range(0, len(losses), every)
    ]


def _mean(flags: Any) -> float:
    flags = list(flags)
    return sum(flags) / max(len(flags), 1)


def _versions() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}
