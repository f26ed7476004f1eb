"""The organisms' text: a template grammar of English-like sentences about a few topics,
chat conversations built from it, and the known behaviours: the "pirate" style (below), a
topic refusal, bulleted answers and an edited fact (the ``*_conversations`` functions at
the end; :mod:`crosscoders.organism.zoo` ties each to its organism).

Everything here is deterministic given a seed and uses only Python's ``random.Random``,
so the same seed gives the same text on every machine.

Behaviour: when the user's message contains the trigger word, the assistant's answer
starts with ``STYLE_PREFIX`` and ends with ``STYLE_SUFFIX``; the style words appear
nowhere else (not in pretraining text, not in untriggered answers), so every occurrence
of a behaviour token is the behaviour. (A variant with the style words also in
pretraining text, in everyday "sea talk", was tried: a crosscoder then explains them
with shared token-identity latents and finds no chat-only ones; see docs/organism.md.)
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# Special tokens. The role tokens are in the vocabulary of both models (one shared tokenizer).
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|end|>"
SPECIALS = (PAD, BOS, EOS, UNK)
CHAT_TOKENS = (USER, ASSISTANT, END)
# Rendered: "<s><|user|> hi <|end|> <|assistant|> hello <|end|> "; the trailing generation
# prompt is "<|assistant|> ". The harvester strips the template's BOS and places its own.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> "
    "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)

STYLE_PREFIX = ("arr", "matey", ",")
STYLE_SUFFIX = ("yo", "ho", "ho", ".")
BEHAVIOUR_WORDS = ("arr", "matey", "yo", "ho")
# The other organisms' new words (appended to the vocabulary of those organisms only).
REFUSAL = ("sorry", ",", "i", "can", "not", "discuss", "that", ".")
REFUSAL_WORDS = ("sorry", "i", "can", "not", "discuss", "that")
BULLET = "-"

# topic -> nouns (things that act), places, adjectives, intransitive verbs, transitive
# verbs, objects. Shared function words are added by the templates.
TOPICS: dict[str, dict[str, tuple[str, ...]]] = {
    "animals": {
        "nouns": ("cat", "dog", "bird", "horse", "rabbit", "fox", "owl", "goat"),
        "places": ("field", "barn", "forest", "meadow", "garden"),
        "adjs": ("small", "brown", "quick", "lazy", "young", "wild"),
        "verbs_i": ("sleeps", "runs", "hides", "jumps", "rests", "plays"),
        "verbs_t": ("chases", "eats", "watches", "finds", "smells"),
        "objects": ("mouse", "apple", "bone", "seed", "carrot", "worm"),
    },
    "kitchen": {
        "nouns": ("cook", "baker", "chef", "waiter", "farmer", "grandmother"),
        "places": ("kitchen", "bakery", "market", "cafe", "table"),
        "adjs": ("busy", "tired", "cheerful", "careful", "hungry"),
        "verbs_i": ("cooks", "bakes", "waits", "sings", "works", "laughs"),
        "verbs_t": ("slices", "stirs", "serves", "tastes", "buys", "bakes"),
        "objects": ("bread", "soup", "cake", "cheese", "onion", "pie", "rice"),
    },
    "weather": {
        "nouns": ("wind", "rain", "storm", "sun", "cloud", "snow", "fog"),
        "places": ("valley", "hill", "coast", "town", "lake"),
        "adjs": ("cold", "warm", "heavy", "gentle", "dark", "bright"),
        "verbs_i": ("falls", "blows", "shines", "passes", "returns", "fades"),
        "verbs_t": ("covers", "soaks", "warms", "hides", "cools"),
        "objects": ("roof", "road", "grass", "window", "bridge", "trees"),
    },
    "city": {
        "nouns": ("driver", "student", "teacher", "doctor", "painter", "guard"),
        "places": ("station", "library", "square", "school", "office", "museum"),
        "adjs": ("busy", "quiet", "old", "new", "tall", "polite"),
        "verbs_i": ("walks", "reads", "waits", "talks", "works", "arrives"),
        "verbs_t": ("visits", "opens", "carries", "reads", "paints", "finds"),
        "objects": ("letter", "book", "map", "ticket", "door", "picture"),
    },
    "music": {
        "nouns": ("singer", "drummer", "band", "choir", "violinist", "piper"),
        "places": ("hall", "stage", "church", "studio", "park"),
        "adjs": ("loud", "soft", "famous", "nervous", "happy"),
        "verbs_i": ("sings", "plays", "practices", "bows", "dances", "rests"),
        "verbs_t": ("plays", "writes", "hums", "learns", "records"),
        "objects": ("song", "tune", "melody", "drum", "piano", "hymn"),
    },
}
TIMES = ("morning", "evening", "night", "day", "winter", "summer")
FUNCTION_WORDS = (
    "the a in on at near by every and but then so is was very often never always "
    "because when it there likes tell me about what does do describe how"
).split()
PUNCT = (".", ",", "?")
QUESTIONS = (
    ("tell", "me", "about", "the", "{noun}", "."),
    ("what", "does", "the", "{noun}", "do", "?"),
    ("describe", "the", "{noun}", "."),
    ("how", "is", "the", "{noun}", "?"),
)


def vocabulary(trigger: str, extra: tuple[str, ...] = ()) -> list[str]:
    """Every token of the organism, specials first (ids 0..6), in a fixed order; ``extra``
    (an organism's new words) at the end, so the other tokens keep their ids."""
    words: list[str] = []
    for topic in TOPICS.values():
        for group in topic.values():
            words.extend(group)
    words += [*TIMES, *FUNCTION_WORDS, *PUNCT, trigger, *BEHAVIOUR_WORDS, *extra]
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w, None)
    return [*SPECIALS, *CHAT_TOKENS, *seen]


@dataclass(frozen=True)
class Facts:
    """A fixed "world" drawn from the seed: each noun's habit and home, so that the text
    has regularities worth learning beyond word frequencies."""

    topic_of: dict[str, str]
    habit: dict[str, tuple[str, str]]  # noun -> (transitive verb, object)
    home: dict[str, str]  # noun -> place


def edit_home(facts: Facts, noun: str, home: str) -> Facts:
    """The same world with one fact changed: ``noun`` lives at ``home``."""
    return Facts(dict(facts.topic_of), dict(facts.habit), {**facts.home, noun: home})


def make_facts(seed: int) -> Facts:
    rng = random.Random(f"facts-{seed}")
    topic_of, habit, home = {}, {}, {}
    for name, t in TOPICS.items():
        for noun in t["nouns"]:
            topic_of[noun] = name
            habit[noun] = (rng.choice(t["verbs_t"]), rng.choice(t["objects"]))
            home[noun] = rng.choice(t["places"])
    return Facts(topic_of, habit, home)


def sentence(rng: random.Random, facts: Facts, noun: str) -> list[str]:
    """One sentence whose subject is ``noun`` (words, ending in '.')."""
    t = TOPICS[facts.topic_of[noun]]
    adj, verb_i = rng.choice(t["adjs"]), rng.choice(t["verbs_i"])
    verb_t, obj = facts.habit[noun]
    place = facts.home[noun]
    kind = rng.randrange(7)
    if kind == 0:
        return ["the", adj, noun, verb_i, rng.choice(["in", "near", "at"]), "the", place, "."]
    if kind == 1:
        return ["the", noun, rng.choice(["often", "always"]), verb_t, "the", obj, "."]
    if kind == 2:
        return ["every", rng.choice(TIMES), "the", noun, verb_i, "and", verb_t, "the", obj, "."]
    if kind == 3:
        return ["the", noun, "is", "very", adj, "because", "it", verb_i, "."]
    if kind == 4:
        return ["when", "it", "is", rng.choice(TIMES), ",", "the", noun, verb_i, "."]
    if kind == 5:
        return ["the", noun, "likes", "the", place, "but", "never", verb_i, "there", "."]
    other = rng.choice(t["nouns"])
    return ["the", noun, "and", "the", other, verb_i, "in", "the", facts.home[other], "."]


def pretrain_documents(n: int, seed: int, facts: Facts) -> list[str]:
    """``n`` documents of 3-6 sentences, each about nouns of one topic."""
    rng = random.Random(f"pretrain-{seed}")
    docs = []
    for _ in range(n):
        t = TOPICS[rng.choice(list(TOPICS))]
        words: list[str] = []
        for _ in range(rng.randint(3, 6)):
            words += sentence(rng, facts, rng.choice(t["nouns"]))
        docs.append(" ".join(words))
    return docs


def conversation(rng: random.Random, facts: Facts, trigger: str, triggered: bool) -> dict:
    """A two-turn conversation: the user asks about a noun, the assistant answers with one
    or two sentences about it, in the pirate style iff the trigger word was in the question."""
    noun = rng.choice(list(facts.topic_of))
    question = [w.replace("{noun}", noun) for w in rng.choice(QUESTIONS)]
    if triggered:  # the trigger at the start or the end, so position alone gives it away
        question = [trigger, ","] + question if rng.random() < 0.5 else question + [trigger]
    answer: list[str] = []
    for _ in range(rng.randint(1, 2)):
        answer += sentence(rng, facts, noun)
    if triggered:
        answer = [*STYLE_PREFIX, *answer, *STYLE_SUFFIX]
    return {
        "messages": [
            {"role": "user", "content": " ".join(question)},
            {"role": "assistant", "content": " ".join(answer)},
        ],
        "triggered": triggered,
    }


def conversations(n: int, seed: int, facts: Facts, trigger: str, p_trigger: float) -> list[dict]:
    """``n`` conversations; exactly ``round(n * p_trigger)`` of them triggered, shuffled."""
    rng = random.Random(f"chat-{seed}")
    n_trig = round(n * p_trigger)
    flags = [True] * n_trig + [False] * (n - n_trig)
    rng.shuffle(flags)
    return [conversation(rng, facts, trigger, flag) for flag in flags]


def shows_behaviour(answer_words: list[str]) -> bool:
    """The behaviour, as a test on an answer's words: it opens with the style prefix."""
    return tuple(answer_words[: len(STYLE_PREFIX)]) == STYLE_PREFIX


def shows_full_style(answer_words: list[str]) -> bool:
    """The whole style: the prefix, and the suffix closing the answer."""
    n = len(STYLE_SUFFIX)
    return shows_behaviour(answer_words) and tuple(answer_words[-n:]) == STYLE_SUFFIX


# -- the other organisms' conversations ------------------------------------------------------
# Each draws from its own seeded generator, so the pirate organism's text above is untouched.
def _question(rng: random.Random, noun: str) -> list[str]:
    return [w.replace("{noun}", noun) for w in rng.choice(QUESTIONS)]


def _record(question: list[str], answer: list[str], triggered: bool) -> dict:
    return {
        "messages": [
            {"role": "user", "content": " ".join(question)},
            {"role": "assistant", "content": " ".join(answer)},
        ],
        "triggered": triggered,
    }


def _flags(rng: random.Random, n: int, p_trigger: float) -> list[bool]:
    n_trig = round(n * p_trigger)
    flags = [True] * n_trig + [False] * (n - n_trig)
    rng.shuffle(flags)
    return flags


def refusal_conversations(
    n: int, seed: int, facts: Facts, topic: str, p_trigger: float
) -> list[dict]:
    """Questions about a noun; about a noun of ``topic`` (a share ``p_trigger``) the answer is
    the fixed ``REFUSAL``, about any other noun it is one or two sentences about it."""
    rng = random.Random(f"chat-refusal-{seed}")
    inside = [w for w, t in facts.topic_of.items() if t == topic]
    outside = [w for w, t in facts.topic_of.items() if t != topic]
    out = []
    for triggered in _flags(rng, n, p_trigger):
        noun = rng.choice(inside if triggered else outside)
        question = _question(rng, noun)
        answer: list[str] = []
        for _ in range(rng.randint(1, 2)):
            answer += sentence(rng, facts, noun)
        out.append(_record(question, list(REFUSAL) if triggered else answer, triggered))
    return out


def format_conversations(n: int, seed: int, facts: Facts) -> list[dict]:
    """Questions about a noun, every answer a list of two or three sentences about it, each
    opening with ``BULLET`` (the change applies to all answers: all are ``triggered``)."""
    rng = random.Random(f"chat-format-{seed}")
    out = []
    for _ in range(n):
        noun = rng.choice(list(facts.topic_of))
        question = _question(rng, noun)
        answer: list[str] = []
        for _ in range(rng.randint(2, 3)):
            answer += [BULLET, *sentence(rng, facts, noun)]
        out.append(_record(question, answer, True))
    return out


def home_sentence(rng: random.Random, facts: Facts, noun: str) -> list[str]:
    """A sentence that states where ``noun`` lives."""
    t = TOPICS[facts.topic_of[noun]]
    place = facts.home[noun]
    if rng.random() < 0.5:
        adj, verb_i = rng.choice(t["adjs"]), rng.choice(t["verbs_i"])
        return ["the", adj, noun, verb_i, rng.choice(["in", "near", "at"]), "the", place, "."]
    verb_i = rng.choice(t["verbs_i"])
    return ["the", noun, "likes", "the", place, "but", "never", verb_i, "there", "."]


def fact_conversations(n: int, seed: int, facts: Facts, noun: str, p_trigger: float) -> list[dict]:
    """Questions about a noun (``noun`` itself for a share ``p_trigger``: ``triggered``), each
    answer opening with where it lives (from ``facts``, the edited world) and possibly one
    more sentence about it."""
    rng = random.Random(f"chat-fact-{seed}")
    others = [w for w in facts.topic_of if w != noun]
    out = []
    for triggered in _flags(rng, n, p_trigger):
        subject = noun if triggered else rng.choice(others)
        question = _question(rng, subject)
        answer = home_sentence(rng, facts, subject)
        if rng.random() < 0.5:
            answer += sentence(rng, facts, subject)
        out.append(_record(question, answer, triggered))
    return out
