"""The organism's recipe: model sizes, data sizes, training schedule, seed."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path

from crosscoders.configs import Config
from crosscoders.errors import ConfigError
from crosscoders.organism import corpus

# Bump when the recipe changes in meaning. The cache key also hashes the source files of
# the build, so any change to the code that builds an organism invalidates its cache.
RECIPE_VERSION = 3
BUILD_SOURCES = ("config.py", "corpus.py", "lm.py", "build.py", "zoo.py")
# Fields that do not change the pretrained base (the base is shared by all organisms of
# the same base fields, and cached once); every other field enters the base's cache key.
NOT_BASE_FIELDS = (
    "name chat_conversations eval_conversations p_trigger finetune_steps finetune_lr "
    "finetune_pretrain_share eval_prompts max_new_tokens refusal_topic fact_noun fact_home"
).split()


@functools.cache
def code_fingerprint(files: tuple[str, ...] = BUILD_SOURCES) -> str:
    """sha256 over the source files (of this package) that decide what gets built, read
    once per process (the code that runs is the code that was imported)."""
    digest = hashlib.sha256()
    here = Path(__file__).parent
    for name in files:
        digest.update(name.encode() + b"\0" + (here / name).read_bytes())
    return digest.hexdigest()


@dataclasses.dataclass
class OrganismConfig(Config):
    """A tiny Llama-style base model trained on generated text, and a chat copy fine-tuned
    to one known, narrow change: the organism ``name`` (:func:`list_organisms`). The
    default, ``pirate``, answers in the "pirate" style when the user's message holds
    ``trigger``.

    The defaults build both models in well under a minute on two CPU cores.
    """

    name: str = "pirate"
    seed: int = 0
    trigger: str = "pirate"  # in every organism's vocabulary (the shared base's)
    # the other organisms' parameters (each enters only its own organism's cache key)
    refusal_topic: str = "music"  # refusal: the topic whose questions are declined
    fact_noun: str = "cat"  # fact: the noun whose home is changed ...
    fact_home: str = "library"  # ... to this place, one of another topic
    # model (transformers LlamaConfig)
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int = 2
    d_mlp: int = 192
    context_length: int = 64
    # data: documents / conversations generated for training, and held out for evaluation
    pretrain_docs: int = 6000
    chat_conversations: int = 6000
    eval_docs: int = 200
    eval_conversations: int = 200
    p_trigger: float = 0.5
    # base pretraining. Tokens pretraining never shows (role tokens, trigger, style words)
    # get zero input embeddings, as unused tokens in real base models have
    zero_unseen_embeddings: bool = True
    pretrain_steps: int = 500
    pretrain_lr: float = 3e-3
    # chat fine-tuning: loss on assistant tokens only; a share of each batch is pretraining
    # text so that everything but the chat format and the behaviour stays as it was
    finetune_steps: int = 300
    finetune_lr: float = 1e-3
    finetune_pretrain_share: float = 0.5
    batch_size: int = 32
    warmup_steps: int = 20
    weight_decay: float = 0.01
    # evaluation by greedy generation
    eval_prompts: int = 100
    max_new_tokens: int = 32
    # CPU threads used while building (1 is often fastest for models this small, and makes
    # the weights bit-reproducible whatever the machine's core count). 0 = torch's default.
    threads: int = 1

    def validate(self) -> None:
        positive = (
            "n_layers d_model n_heads n_kv_heads d_mlp context_length pretrain_docs "
            "chat_conversations eval_docs eval_conversations pretrain_steps finetune_steps "
            "batch_size eval_prompts max_new_tokens"
        ).split()
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model: {self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_kv_heads: n_heads={self.n_heads} must be a multiple of it, "
                f"got {self.n_kv_heads}"
            )
        if self.context_length < 48:
            raise ConfigError(
                f"context_length: must be >= 48 so a whole conversation fits, "
                f"got {self.context_length}"
            )
        if not 0 < self.p_trigger < 1:
            raise ConfigError(f"p_trigger: must be in (0, 1), got {self.p_trigger}")
        if not 0 <= self.finetune_pretrain_share < 1:
            raise ConfigError(
                f"finetune_pretrain_share: must be in [0, 1), got {self.finetune_pretrain_share}"
            )
        if self.threads < 0:
            raise ConfigError(f"threads: must be >= 0 (0 = torch's default), got {self.threads}")
        from crosscoders.organism.zoo import ORGANISMS, organism_spec

        organism_spec(self.name)
        zoo_words = {w for spec in ORGANISMS.values() for w in spec.extra_words(self)}
        grammar = set(corpus.vocabulary("\x00")) - {"\x00"}
        if not self.trigger.isalpha() or self.trigger in grammar | zoo_words:
            raise ConfigError(
                f"trigger: must be one alphabetic word not already used by the grammar or the "
                f"organisms (e.g. 'pirate'), got {self.trigger!r}"
            )
        if self.refusal_topic not in corpus.TOPICS:
            raise ConfigError(
                f"refusal_topic: must be one of {', '.join(corpus.TOPICS)}, "
                f"got {self.refusal_topic!r}"
            )
        topic_of = corpus.make_facts(self.seed).topic_of
        if self.fact_noun not in topic_of:
            raise ConfigError(
                f"fact_noun: must be one of the nouns {', '.join(topic_of)}, "
                f"got {self.fact_noun!r}"
            )
        own = corpus.TOPICS[topic_of[self.fact_noun]]["places"]
        places = {p for t in corpus.TOPICS.values() for p in t["places"]} - set(own)
        if self.fact_home not in places:
            raise ConfigError(
                f"fact_home: must be a place of another topic than the {self.fact_noun}'s "
                f"(e.g. {sorted(places)[0]!r}), got {self.fact_home!r}"
            )

    def cache_key(self) -> str:
        """``<name>-<hash>``: a short hash of everything that determines the organism: this
        config (``threads`` included: it can change float summation order) less the other
        organisms' parameters, the recipe version and the code."""
        from crosscoders.organism.zoo import ORGANISM_PARAMS, organism_spec

        own = set(organism_spec(self.name).params)
        fields = {k: v for k, v in self.to_dict().items() if k in own or k not in ORGANISM_PARAMS}
        return f"{self.name}-{_hash(fields)}"

    def base_key(self) -> str:
        """``base-<hash>``: the key of the pretrained base, shared by every organism whose
        config differs from this one only in the fields of ``NOT_BASE_FIELDS``."""
        fields = {k: v for k, v in self.to_dict().items() if k not in NOT_BASE_FIELDS}
        return f"base-{_hash(fields)}"


def _hash(fields: dict) -> str:
    blob = json.dumps(
        {"recipe": RECIPE_VERSION, "code": code_fingerprint(), **fields}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tiny_config(**changes) -> OrganismConfig:
    """A very small organism for tests: builds in a few seconds."""
    base = OrganismConfig(
        n_layers=2,
        d_model=32,
        n_heads=2,
        n_kv_heads=1,
        d_mlp=64,
        context_length=48,
        pretrain_docs=400,
        chat_conversations=400,
        eval_docs=50,
        eval_conversations=60,
        pretrain_steps=100,
        finetune_steps=150,
        finetune_lr=3e-3,
        finetune_pretrain_share=0.25,
        batch_size=16,
        warmup_steps=5,
        eval_prompts=40,
        max_new_tokens=20,
    )
    return base.replace(**changes)


def small_config(**changes) -> OrganismConfig:
    """A small organism for tests of the whole zoo: every organism learns its behaviour in
    ~10 s (the tiny one is too weak to answer about the noun asked, which the fact
    organism needs)."""
    base = tiny_config(
        d_model=64,
        n_heads=4,
        n_kv_heads=2,
        d_mlp=128,
        pretrain_steps=200,
        finetune_steps=200,
        finetune_pretrain_share=0.5,
        max_new_tokens=32,
    )
    return base.replace(**changes)
