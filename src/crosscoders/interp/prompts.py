"""The prompts (``prompts.yaml``, or a user's copy), how contexts are written into them, and
how the answers are read back."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import yaml

from crosscoders.errors import ConfigError
from crosscoders.interp.contexts import Context

#: section -> the placeholders its user message must contain
PLACEHOLDERS: dict[str, tuple[str, ...]] = {
    "explain": ("examples",),
    "detection": ("explanation", "contexts", "n"),
    "fuzzing": ("explanation", "contexts", "n"),
}
OPEN, CLOSE = "<<", ">>"


class AnswerError(ValueError):
    """An LLM answer that does not have the form the prompt asks for."""


@dataclasses.dataclass(frozen=True)
class Prompts:
    """``{section: {"system": text, "user": text}}`` for the sections of
    :data:`PLACEHOLDERS`, checked on load."""

    sections: dict[str, dict[str, str]]
    source: str

    @classmethod
    def load(cls, path: str | Path | None = None) -> Prompts:
        """The prompts in ``path``, or the default ones shipped with the package."""
        if path is None:
            text = resources.files("crosscoders.interp").joinpath("prompts.yaml").read_text()
            source = "the default prompts"
        else:
            try:
                text = Path(path).read_text()
            except OSError as err:
                raise ConfigError(f"--prompts {path}: cannot read it ({err.strerror}); check "
                                  "the path") from None
            source = str(path)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            where = getattr(err, "problem_mark", None)
            line = f" at line {where.line + 1}" if where is not None else ""
            raise ConfigError(f"{source} is not valid YAML{line}; fix it or start again from "
                              "the default prompts.yaml") from None
        return cls(_check(data, source), source)

    def messages(self, section: str, **values: object) -> list[dict[str, str]]:
        """Chat messages of ``section`` with the ``{name}`` placeholders filled in (other
        braces are left as written)."""
        out = []
        for role in ("system", "user"):
            text = self.sections[section].get(role, "")
            for name, value in values.items():
                text = text.replace("{" + name + "}", str(value))
            if text.strip():
                out.append({"role": role, "content": text.strip()})
        return out


def _check(data: object, source: str) -> dict[str, dict[str, str]]:
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a mapping with sections {', '.join(PLACEHOLDERS)}; "
                          "start from the default prompts.yaml")
    out = {}
    for section, names in PLACEHOLDERS.items():
        part = data.get(section)
        if not isinstance(part, dict) or not isinstance(part.get("user"), str):
            raise ConfigError(f"{source}: section {section!r} needs a 'user' message (and may "
                              "have a 'system' one); copy it from the default prompts.yaml")
        for name in names:
            if "{" + name + "}" not in part["user"]:
                raise ConfigError(f"{source}: {section}.user lacks the placeholder {{{name}}}; "
                                  "put it where that text belongs")
        out[section] = {k: str(v) for k, v in part.items() if k in ("system", "user")}
    return out


# ------------------------------------------------------------------ writing contexts
def _one_line(text: str) -> str:
    return text.replace("\r", "").replace("\n", " ↵ ")


def marked_text(tokens: Sequence[str], marked: set[int]) -> str:
    """The tokens as text, those at ``marked`` positions written <<like this>> (a token's
    leading space stays outside the marks)."""
    parts = []
    for i, tok in enumerate(tokens):
        if i in marked and tok.strip():
            stripped = tok.lstrip()
            parts.append(tok[: len(tok) - len(stripped)] + OPEN + stripped + CLOSE)
        else:
            parts.append(tok)
    return _one_line("".join(parts)).strip()


def explain_examples(contexts: Sequence[Context], max_act: float) -> str:
    """The explainer's view: each context with the tokens it fires on marked, and their
    activations on a 0-10 scale (10 = ``max_act``)."""
    blocks = []
    for n, c in enumerate(contexts, 1):
        scaled = [round(10 * a / max_act) if max_act > 0 else 0 for a in c.acts]
        marked = {i for i, s in enumerate(scaled) if s >= 1}
        strongest = sorted(marked, key=lambda i: -c.acts[i])[:8]
        listed = ", ".join(f'"{c.tokens[i].strip()}" {scaled[i]}' for i in strongest)
        blocks.append(f"Excerpt {n}: {marked_text(c.tokens, marked)}\n"
                      f"Activations: {listed or 'weak everywhere'}")
    return "\n\n".join(blocks)


def numbered(texts: Sequence[str]) -> str:
    return "\n".join(f"{n}. {t}" for n, t in enumerate(texts, 1))


# ------------------------------------------------------------------ reading answers
_EXPLANATION = re.compile(r"explanation\s*[:\-]\s*(.+)", re.IGNORECASE)
_LIST = re.compile(r"\[([\d,\s]*)\]")


def parse_explanation(answer: str, limit: int = 300) -> str:
    """The explanation in an answer: what follows "Explanation:", else its first line."""
    found = _EXPLANATION.search(answer)
    text = found.group(1) if found else next(
        (line for line in answer.splitlines() if line.strip()), "")
    text = text.strip().strip("*`_ ").strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'":  # a quoted phrase
        text = text[1:-1].strip()
    if not text:
        raise AnswerError("the explanation answer is empty")
    return text[:limit]


def parse_numbers(answer: str, n: int) -> set[int]:
    """The context numbers (1..n) of the last ``[..]`` list in an answer."""
    found = _LIST.findall(answer)
    if not found:
        raise AnswerError(f"no list of context numbers like [1, 3] in the answer "
                          f"{answer.strip()[:80]!r}")
    numbers = {int(x) for x in re.findall(r"\d+", found[-1])}
    bad = sorted(x for x in numbers if not 1 <= x <= n)
    if bad:
        raise AnswerError(f"the answer names context {bad[0]}, but there are {n}")
    return numbers
