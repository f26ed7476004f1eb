"""Where the explainer and scorer LLM runs.

- :class:`EndpointBackend`: any OpenAI-compatible chat-completions endpoint (vLLM, the
  llama.cpp server, OpenAI, ...), through the ``openai`` client (``pip install
  'crosscoders[interp]'``); without that package installed the same request is sent with the
  standard library, so a local server works with no extra install.
- :class:`LocalBackend`: a transformers causal LM on this machine (a model directory, hub id
  or GGUF file), greedy decoding, one request at a time.

A backend answers one request (``complete``) and says what makes answers differ
(``identity``, part of the cache key). Failures that may pass (HTTP 429, 5xx, a refused or
timed-out connection) raise :class:`TransientError`, retried by the caller; the rest raise
a one-line :class:`~crosscoders.errors.CrosscodersError` naming the fix.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.error
import urllib.request
from typing import Any, Protocol

from crosscoders.errors import ConfigError, CrosscodersError

Messages = list[dict[str, str]]


class TransientError(Exception):
    """A failure worth retrying; ``retry_after``: seconds the server asked to wait."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Backend(Protocol):
    identity: str

    def complete(self, messages: Messages, max_tokens: int, temperature: float) -> str:
        """The assistant's answer to ``messages``."""
        ...


def _status_error(status: int, detail: str, api_base: str) -> Exception:
    """The error for an HTTP status: transient (retry) or the fix in one line."""
    detail = " ".join(detail.split())[:160]
    if status in (408, 409, 429) or status >= 500:
        return TransientError(f"HTTP {status}" + (f": {detail}" if detail else ""))
    if status in (401, 403):
        fix = "pass --api-key KEY or set OPENAI_API_KEY"
    elif status == 404:
        fix = ("check --api-base (usually ending in /v1) and --model (a model the server "
               "serves)")
    else:
        fix = "check --model and --max-tokens against what the server accepts"
    return CrosscodersError(f"the endpoint {api_base} refused the request (HTTP {status}"
                            + (f": {detail}" if detail else "") + f"); {fix}")


def _retry_after(headers: Any) -> float | None:
    try:
        value = headers.get("retry-after") if headers is not None else None
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None  # an HTTP date: fall back to our own back-off


class EndpointBackend:
    """An OpenAI-compatible ``/chat/completions`` endpoint at ``api_base``."""

    def __init__(self, api_base: str, model: str, api_key: str | None = None,
                 timeout: float = 120.0, use_openai: bool | None = None) -> None:
        if not api_base.startswith(("http://", "https://")):
            raise ConfigError(f"--api-base {api_base!r} is not an http(s) URL; give e.g. "
                              "http://localhost:8000/v1")
        self.api_base = api_base.rstrip("/")
        self.model = model
        self.timeout = timeout
        self.identity = f"endpoint:{model}"
        key = api_key or os.environ.get("OPENAI_API_KEY") or "none"  # local servers need none
        self._key = key
        self._client = None
        if use_openai is not False:
            try:
                import openai
            except ImportError:
                if use_openai:
                    raise ConfigError("the openai package is not installed; pip install "
                                      "'crosscoders[interp]'") from None
            else:
                self._openai = openai
                self._client = openai.OpenAI(base_url=self.api_base, api_key=key,
                                             max_retries=0, timeout=timeout)

    @property
    def client_name(self) -> str:
        return "openai" if self._client is not None else "urllib"

    def complete(self, messages: Messages, max_tokens: int, temperature: float) -> str:
        if self._client is not None:
            return self._complete_openai(messages, max_tokens, temperature)
        return self._complete_urllib(messages, max_tokens, temperature)

    def _complete_openai(self, messages: Messages, max_tokens: int, temperature: float) -> str:
        openai = self._openai
        try:
            response = self._client.chat.completions.create(
                model=self.model, messages=messages, max_tokens=max_tokens,
                temperature=temperature)
        except openai.APIStatusError as err:
            raised = _status_error(err.status_code, _detail(err.body) or err.message,
                                   self.api_base)
            if isinstance(raised, TransientError):
                raised.retry_after = _retry_after(err.response.headers)
            raise raised from None
        except openai.APIConnectionError as err:  # refused, reset, timed out
            raise TransientError(f"cannot reach {self.api_base} ({_cause(err)})") from None
        choices = getattr(response, "choices", None) or []
        return (choices[0].message.content or "") if choices else ""

    def _complete_urllib(self, messages: Messages, max_tokens: int, temperature: float) -> str:
        body = json.dumps({"model": self.model, "messages": messages,
                           "max_tokens": max_tokens, "temperature": temperature}).encode()
        request = urllib.request.Request(
            self.api_base + "/chat/completions", data=body, method="POST",
            headers={"Content-Type": "application/json",
                     "Authorization": f"Bearer {self._key}"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                payload = reply.read()
        except urllib.error.HTTPError as err:
            raised = _status_error(err.code, _detail(_read(err)), self.api_base)
            if isinstance(raised, TransientError):
                raised.retry_after = _retry_after(err.headers)
            raise raised from None
        except (urllib.error.URLError, OSError) as err:  # refused, reset, timed out
            reason = getattr(err, "reason", err)
            raise TransientError(f"cannot reach {self.api_base} ({reason})") from None
        try:
            data = json.loads(payload)
            return data["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise TransientError(f"{self.api_base} sent a reply that is not a chat "
                                 f"completion ({payload[:80]!r})") from None


def _read(err: urllib.error.HTTPError) -> bytes:
    try:
        return err.read()
    except OSError:
        return b""


def _detail(body: Any) -> str:
    """The message of an error body (OpenAI style ``{"error": {"message": ...}}``)."""
    if isinstance(body, (bytes, str)):
        try:
            body = json.loads(body)
        except ValueError:
            return body.decode(errors="replace") if isinstance(body, bytes) else body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            return str(inner.get("message", ""))
        return str(inner)
    return ""


def _cause(err: BaseException) -> str:
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return str(err) or type(err).__name__


class LocalBackend:
    """A transformers causal LM at ``path`` (directory, hub id or ``.gguf`` file), greedy.

    Its chat template formats the messages when the tokenizer has one; otherwise they are
    joined as plain text. Requests are served one at a time."""

    def __init__(self, path: str, device: str = "cpu", dtype: str = "float32") -> None:
        from crosscoders.harvest.config import ModelSpec
        from crosscoders.harvest.models import load_model, load_tokenizer

        spec = ModelSpec(path)
        self.tokenizer = load_tokenizer(spec)
        self.model = load_model(spec, dtype, device)
        self.device = device
        self.identity = f"local:{os.path.abspath(path) if os.path.exists(path) else path}"
        self._lock = threading.Lock()

    def _prompt_ids(self, messages: Messages) -> Any:
        import torch

        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(messages, add_generation_prompt=True,
                                          tokenize=True, return_dict=False)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        else:
            text = "\n\n".join(m["content"] for m in messages) + "\n\n"
            ids = tok(text)["input_ids"]
        return torch.as_tensor([list(ids)], device=self.device)

    def complete(self, messages: Messages, max_tokens: int, temperature: float) -> str:
        import torch

        with self._lock, torch.inference_mode():
            ids = self._prompt_ids(messages)
            out = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                do_sample=False, pad_token_id=self.tokenizer.pad_token_id
                if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
