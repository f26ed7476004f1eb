"""Asking a backend: an on-disk answer cache, a rate limit, and retries with back-off.

Every answer is stored (SQLite, committed at once) under a hash of everything that shapes
it: the backend's identity (model), the messages, ``max_tokens`` and ``temperature``. A
re-run therefore sends nothing it has sent before, and a run stopped half-way (killed,
^C, an endpoint that went down) resumes where it stopped. The API base and key are not
part of the key, so the same model served elsewhere reuses the answers.
"""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from crosscoders.errors import CrosscodersError
from crosscoders.interp.backends import Backend, Messages, TransientError
from crosscoders.io import unreadable


class AnswerCache:
    """``key -> answer`` in one SQLite file; safe to share between threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._con = sqlite3.connect(str(self.path), check_same_thread=False)
            self._con.execute("CREATE TABLE IF NOT EXISTS answers "
                              "(key TEXT PRIMARY KEY, answer TEXT NOT NULL)")
            self._con.commit()
        except sqlite3.DatabaseError as err:
            raise unreadable(self.path, "an answer cache", err,
                             "delete it (only cached answers are lost) and re-run") from None

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._con.execute("SELECT answer FROM answers WHERE key = ?",
                                    (key,)).fetchone()
        return row[0] if row else None

    def put(self, key: str, answer: str) -> None:
        with self._lock:
            self._con.execute("INSERT OR REPLACE INTO answers VALUES (?, ?)", (key, answer))
            self._con.commit()

    def close(self) -> None:
        with self._lock:
            self._con.close()


class RateLimit:
    """At most ``per_minute`` requests a minute, spaced evenly (None: no limit)."""

    def __init__(self, per_minute: float | None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.interval = 60.0 / per_minute if per_minute else 0.0
        self.clock, self.sleep = clock, sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = self.clock()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            self.sleep(start - now)


class EndpointError(CrosscodersError):
    """The backend kept failing after every retry."""


class Stopped(Exception):
    """Not sent: the run is stopping (another request failed for good, or ^C)."""


class Asker:
    """Answers from the cache, else from the backend: rate-limited, retried on transient
    failures with exponential back-off (``backoff * 2**attempt`` seconds, jittered, at most
    ``max_wait``; a server's Retry-After is honoured), then :class:`EndpointError`.

    Once ``stop`` is set, nothing more is sent (cached answers are still given) and a
    waiting retry gives up at once: :class:`Stopped`."""

    def __init__(self, backend: Backend, cache: AnswerCache | None, retries: int = 5,
                 backoff: float = 1.0, max_wait: float = 60.0,
                 per_minute: float | None = None) -> None:
        self.backend, self.cache = backend, cache
        self.retries, self.backoff, self.max_wait = retries, backoff, max_wait
        self.rate = RateLimit(per_minute)
        self.stop = threading.Event()
        self.sent = self.cached = 0
        self._lock = threading.Lock()

    def key(self, messages: Messages, max_tokens: int, temperature: float) -> str:
        blob = json.dumps([self.backend.identity, messages, max_tokens, temperature],
                          sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def ask(self, messages: Messages, max_tokens: int, temperature: float = 0.0) -> str:
        key = self.key(messages, max_tokens, temperature)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                with self._lock:
                    self.cached += 1
                return hit
        for attempt in range(self.retries + 1):
            self.rate.wait()
            if self.stop.is_set():
                raise Stopped
            with self._lock:
                self.sent += 1
            try:
                answer = self.backend.complete(messages, max_tokens, temperature)
                break
            except TransientError as err:
                if attempt == self.retries:
                    raise EndpointError(
                        f"{err} after {self.retries + 1} tries; check that the server is up "
                        "and --api-base, then run the same command again (answers so far "
                        "are kept and not asked again)") from None
                wait = self.backoff * 2**attempt * (0.5 + random.random())
                if err.retry_after is not None:
                    wait = max(wait, err.retry_after)
                if self.stop.wait(min(wait, self.max_wait)):
                    raise Stopped from None
        if self.cache is not None:
            self.cache.put(key, answer)
        return answer
