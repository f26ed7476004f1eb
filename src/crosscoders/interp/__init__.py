"""Auto-interpretation of latents: an LLM explains each latent from its activating contexts,
and a scorer measures each explanation on held-out contexts (``crosscoders explain``).

    from crosscoders.interp import EndpointBackend, ExplainConfig, explain_latents
    summary = explain_latents("runs/cc/diff", "chat_only,shared",
                              EndpointBackend("http://localhost:8000/v1", "my-model"))

See ``docs/interp.md``. Importing this package loads neither ``openai`` nor transformers.
"""

from crosscoders.interp.backends import EndpointBackend, LocalBackend, TransientError
from crosscoders.interp.client import AnswerCache, Asker, EndpointError
from crosscoders.interp.contexts import ActivationCheck, Context, read_examples
from crosscoders.interp.explain import (
    ExplainConfig,
    explain_latents,
    format_summary,
    select_latents,
    summarize,
)
from crosscoders.interp.prompts import AnswerError, Prompts
from crosscoders.interp.results import merge_explanations, read_explanations
from crosscoders.interp.score import balanced_accuracy, confusion

__all__ = [
    "ActivationCheck", "AnswerCache", "AnswerError", "Asker", "Context", "EndpointBackend",
    "EndpointError", "ExplainConfig", "LocalBackend", "Prompts", "TransientError",
    "balanced_accuracy", "confusion", "explain_latents", "format_summary",
    "merge_explanations", "read_examples", "read_explanations", "select_latents",
    "summarize",
]
