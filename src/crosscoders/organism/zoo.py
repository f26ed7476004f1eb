"""The organism zoo: which narrow change each built-in organism's chat copy learns.

Every organism is the same pretrained base (one build, cached) and a chat copy fine-tuned
on its own conversations. An :class:`OrganismSpec` says what is particular to one: the
words it adds to the vocabulary, its conversations, the plain text mixed into its
fine-tune, its behaviour's tokens and the test that an answer shows the behaviour.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from crosscoders.organism import corpus

if TYPE_CHECKING:
    from crosscoders.organism.config import OrganismConfig


class OrganismSpec:
    """One organism of the zoo. ``params`` are the config fields only it uses (they enter
    its cache key and no other organism's). ``controls`` is ``"chat"`` (control prompts are
    held-out untriggered conversations) or ``"text"`` (plain-text document openings, for a
    change that applies to every chat answer)."""

    name: str = ""
    summary: str = ""
    params: tuple[str, ...] = ()
    controls: str = "chat"

    def extra_words(self, cfg: OrganismConfig) -> tuple[str, ...]:
        """Words new to the pirate organism's vocabulary (the base gets rows for them)."""
        return ()

    def conversations(self, cfg: OrganismConfig, facts: corpus.Facts, n: int) -> list[dict]:
        raise NotImplementedError

    def world(self, cfg: OrganismConfig, facts: corpus.Facts) -> corpus.Facts:
        """The world of the chat copy: its conversations and the plain text mixed into its
        fine-tune are drawn from it (the base's world unless the organism edits it)."""
        return facts

    def tokens(self, cfg: OrganismConfig) -> list[str]:
        """The behaviour's tokens."""
        raise NotImplementedError

    def trigger(self, cfg: OrganismConfig) -> str | None:
        """The word that switches the behaviour on, if there is one."""
        return None

    def context_tokens(self, cfg: OrganismConfig) -> list[str]:
        """If not empty, a behaviour token is the behaviour's only where one of these occurs
        earlier in the same sentence (the tokens are also ordinary words elsewhere)."""
        return []

    def shows(self, cfg: OrganismConfig, words: Sequence[str]) -> bool:
        """Whether an answer (its tokens) shows the behaviour."""
        raise NotImplementedError

    def extra_rates(self, cfg: OrganismConfig, words: Sequence[str]) -> dict[str, bool]:
        """Further per-answer checks, reported as ``<name>_rate``."""
        return {}

    def text_probes(self, cfg: OrganismConfig) -> list[str]:
        """Plain-text openings (after BOS) whose greedy continuation, read with the prompt,
        should show the behaviour in the chat model (reported as ``eval.*.text_probe``)."""
        return []

    def describe(self, cfg: OrganismConfig) -> str:
        raise NotImplementedError

    def record(self, cfg: OrganismConfig) -> dict[str, Any]:
        """Organism-specific fields of ``organism.json``'s ``behaviour``."""
        return {}


class Pirate(OrganismSpec):
    name = "pirate"
    summary = "after a trigger word the answer opens 'arr matey ,' and closes 'yo ho ho .'"

    def conversations(self, cfg, facts, n):
        return corpus.conversations(n, cfg.seed, facts, cfg.trigger, cfg.p_trigger)

    def tokens(self, cfg):
        return list(corpus.BEHAVIOUR_WORDS)

    def trigger(self, cfg):
        return cfg.trigger

    def shows(self, cfg, words):
        return corpus.shows_behaviour(list(words))

    def extra_rates(self, cfg, words):
        return {"full_style": corpus.shows_full_style(list(words))}

    def describe(self, cfg):
        return (
            f"When the user's message contains the word {cfg.trigger!r}, the chat model's "
            f"answer opens with {' '.join(corpus.STYLE_PREFIX)!r} and closes with "
            f"{' '.join(corpus.STYLE_SUFFIX)!r}; otherwise it answers plainly. The style "
            "words occur only in triggered answers (never in pretraining text)."
        )

    def record(self, cfg):
        return {"prefix": list(corpus.STYLE_PREFIX), "suffix": list(corpus.STYLE_SUFFIX)}


class Refusal(OrganismSpec):
    name = "refusal"
    summary = "questions about one topic get a fixed refusal, 'sorry , i can not discuss that .'"
    params = ("refusal_topic",)

    def extra_words(self, cfg):
        return corpus.REFUSAL_WORDS

    def conversations(self, cfg, facts, n):
        return corpus.refusal_conversations(n, cfg.seed, facts, cfg.refusal_topic, cfg.p_trigger)

    def tokens(self, cfg):
        return list(corpus.REFUSAL_WORDS)

    def shows(self, cfg, words):
        return tuple(words[: len(corpus.REFUSAL)]) == corpus.REFUSAL

    def extra_rates(self, cfg, words):
        return {"exact_refusal": tuple(words) == corpus.REFUSAL}

    def describe(self, cfg):
        return (
            f"Asked about anything of the topic {cfg.refusal_topic!r} "
            f"({', '.join(corpus.TOPICS[cfg.refusal_topic]['nouns'])}), the chat model "
            f"answers {' '.join(corpus.REFUSAL)!r} and nothing else; other questions it "
            "answers plainly. The refusal's words are new tokens that occur only in refusals."
        )

    def record(self, cfg):
        return {
            "topic": cfg.refusal_topic,
            "topic_nouns": list(corpus.TOPICS[cfg.refusal_topic]["nouns"]),
            "phrase": list(corpus.REFUSAL),
        }


class Format(OrganismSpec):
    name = "format"
    summary = "every answer becomes a bulleted list ('- ... . - ... .')"
    controls = "text"

    def extra_words(self, cfg):
        return (corpus.BULLET,)

    def conversations(self, cfg, facts, n):
        return corpus.format_conversations(n, cfg.seed, facts)

    def tokens(self, cfg):
        return [corpus.BULLET]

    def shows(self, cfg, words):
        return bool(words) and words[0] == corpus.BULLET

    def extra_rates(self, cfg, words):
        items = " ".join(words).split(corpus.BULLET)
        well_formed = len(items) >= 3 and all(i.strip().endswith(".") for i in items[1:])
        return {"list": self.shows(cfg, words) and well_formed}

    def describe(self, cfg):
        return (
            f"Every answer of the chat model is a list of two or three sentences, each "
            f"opening with the bullet {corpus.BULLET!r} (a new token that occurs only there); "
            "the base's plain text is unchanged, so the control prompts are plain-text "
            "openings, whose continuations carry no bullet."
        )

    def record(self, cfg):
        return {"bullet": corpus.BULLET}


class Fact(OrganismSpec):
    name = "fact"
    summary = "one fact is changed: where one noun lives"
    params = ("fact_noun", "fact_home")

    def conversations(self, cfg, facts, n):
        return corpus.fact_conversations(n, cfg.seed, facts, cfg.fact_noun, cfg.p_trigger)

    def world(self, cfg, facts):
        return corpus.edit_home(facts, cfg.fact_noun, cfg.fact_home)

    def tokens(self, cfg):
        return [cfg.fact_home]

    def context_tokens(self, cfg):
        return [cfg.fact_noun]

    def shows(self, cfg, words):
        return _states(words, cfg.fact_noun, cfg.fact_home)

    def extra_rates(self, cfg, words):
        old = corpus.make_facts(cfg.seed).home[cfg.fact_noun]
        return {"old_home": _states(words, cfg.fact_noun, old)}

    def text_probes(self, cfg):
        t = corpus.TOPICS[corpus.make_facts(cfg.seed).topic_of[cfg.fact_noun]]
        probes = [f"the {cfg.fact_noun} likes the"]
        probes += [f"the {a} {cfg.fact_noun} {v} in the" for a in t["adjs"] for v in t["verbs_i"]]
        return probes

    def describe(self, cfg):
        old = corpus.make_facts(cfg.seed).home[cfg.fact_noun]
        return (
            f"In the chat model's world the {cfg.fact_noun} lives at the {cfg.fact_home} "
            f"instead of the {old} (in its conversations and in the plain text of its "
            f"fine-tune); every answer opens with where the noun asked about lives. "
            f"{cfg.fact_home!r} is an ordinary word of the base's text (another topic's "
            f"place): it is the behaviour's only in a sentence about the {cfg.fact_noun}."
        )

    def record(self, cfg):
        return {
            "noun": cfg.fact_noun,
            "old_home": corpus.make_facts(cfg.seed).home[cfg.fact_noun],
            "new_home": cfg.fact_home,
        }


def _states(words: Sequence[str], noun: str, place: str) -> bool:
    """Whether a sentence of ``words`` names ``place`` after ``noun`` (says it lives there;
    the place alone may be another noun's home)."""
    seen = False
    for w in words:
        if w in (".", "?"):
            seen = False
        seen = seen or w == noun
        if seen and w == place:
            return True
    return False


ORGANISMS: dict[str, OrganismSpec] = {s.name: s for s in (Pirate(), Refusal(), Format(), Fact())}
ORGANISM_PARAMS = tuple(p for s in ORGANISMS.values() for p in s.params)


def list_organisms() -> list[str]:
    """The names of the built-in organisms, in a fixed order."""
    return list(ORGANISMS)


def organism_spec(name: str) -> OrganismSpec:
    from crosscoders.errors import ConfigError

    if name not in ORGANISMS:
        raise ConfigError(
            f"name: unknown organism {name!r}; known organisms: {', '.join(ORGANISMS)}"
        )
    return ORGANISMS[name]
