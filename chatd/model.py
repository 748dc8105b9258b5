"""Model backends: where assistant replies come from.

A backend turns a :class:`ModelRequest` into an async iterator of text tokens
and raises :class:`~chatd.errors.ModelError` when generation fails. Both run
natively under Trio (the OpenAI-compatible one through httpx), so a stream's
nursery can cancel them at any await.

* ``fake``: deterministic text at a configured rate; the default, so chatd
  runs with no model. A prompt may steer it with ``#tokens=N``, ``#rate=R``
  and ``#fail@K`` (fail after K tokens), for tests and demos; ``#clock``
  makes each token the system monotonic time it was emitted at, so
  ``chatd bench stream`` can measure emit-to-screen latency across processes.
* ``openai``: any ``/v1/chat/completions`` endpoint with ``stream: true``
  (vLLM, llama.cpp server, Ollama, hosted APIs).
"""

from __future__ import annotations

import random
import re
import time
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import orjson
import trio

from chatd.config import ModelConfig
from chatd.errors import ModelError


@dataclass(frozen=True)
class ModelRequest:
    """What a reply is generated from."""

    conv: str
    #: The user message being answered.
    prompt: str
    #: The conversation's recent messages, oldest first (only if the model wants them).
    context: list[dict[str, Any]]


class Model(Protocol):
    name: str
    #: Whether requests need the conversation's recent messages (a Postgres read).
    wants_context: bool

    def generate(self, request: ModelRequest) -> AsyncIterator[str]:
        """Yield the reply's tokens; raise ModelError if generation fails."""
        ...


# Multi-byte words on purpose: offsets count code points, not bytes.
_WORDS = (
    "the reply arrives token by token and every screen sees it at once while "
    "postgres keeps the truth redis carries the live lane café naïve déjà-vu "
    "→ ✓ 🙂 durable stream offset snapshot partial tail nursery trio relay outbox"
).split()
_DIRECTIVE = re.compile(r"#(tokens|rate|fail)[=@](\d+(?:\.\d+)?)")


class FakeModel:
    """Deterministic text: the same prompt always yields the same tokens."""

    name = "fake"
    wants_context = False

    def __init__(self, cfg: ModelConfig) -> None:
        self._tokens = cfg.fake_tokens
        self._rate = cfg.fake_token_rate
        self._fail_after = cfg.fake_fail_after or None

    async def generate(self, request: ModelRequest) -> AsyncIterator[str]:
        prompt = request.prompt
        tokens, rate, fail_after = self._tokens, self._rate, self._fail_after
        for key, value in _DIRECTIVE.findall(prompt):
            if key == "tokens":
                tokens = int(float(value))
            elif key == "rate":
                rate = float(value)
            else:
                fail_after = int(float(value))
        clock = "#clock" in prompt
        rng = random.Random(zlib.crc32(prompt.encode()))
        interval = 1.0 / rate if rate > 0 else 0.0
        start = trio.current_time()
        for i in range(tokens):
            if fail_after is not None and i >= fail_after:
                raise ModelError(f"fake model failure after {i} tokens (as configured)")
            if interval:
                # A steady rate: lateness of one wakeup does not slow the rest.
                await trio.sleep_until(start + (i + 1) * interval)
            else:
                await trio.lowlevel.checkpoint()
            # CLOCK_MONOTONIC is shared by every process on the machine.
            word = f"@{time.monotonic():.6f}" if clock else rng.choice(_WORDS)
            yield word if i == 0 else " " + word
        if fail_after == tokens:
            raise ModelError(f"fake model failure after {tokens} tokens (as configured)")


class OpenAIModel:
    """An OpenAI-compatible chat completions endpoint, streamed over SSE."""

    name = "openai"
    wants_context = True

    def __init__(self, cfg: ModelConfig, client: httpx.AsyncClient) -> None:
        self._cfg = cfg
        self._client = client

    def _messages(self, request: ModelRequest) -> list[dict[str, str]]:
        out = []
        if self._cfg.system_prompt:
            out.append({"role": "system", "content": self._cfg.system_prompt})
        for m in request.context[-self._cfg.context_messages :]:
            role = m.get("role", "user")
            if role not in ("user", "assistant", "system"):
                role = "user"
            out.append({"role": role, "content": str(m.get("text", ""))})
        if not request.context:
            out.append({"role": "user", "content": request.prompt})
        return out

    async def generate(self, request: ModelRequest) -> AsyncIterator[str]:
        body = {"model": self._cfg.model, "messages": self._messages(request), "stream": True}
        headers = {"Accept": "text/event-stream"}
        if self._cfg.api_key:
            headers["Authorization"] = f"Bearer {self._cfg.api_key}"
        url = self._cfg.base_url.rstrip("/") + "/chat/completions"
        try:
            async with self._client.stream("POST", url, json=body, headers=headers) as resp:
                if resp.status_code != 200:
                    detail = (await resp.aread())[:300].decode(errors="replace")
                    raise ModelError(f"model endpoint answered HTTP {resp.status_code}: {detail}")
                finished = False
                async for line in resp.aiter_lines():
                    text, done = _parse_sse_line(line)
                    if done:
                        finished = True
                        break
                    if text:
                        yield text
                if not finished:
                    raise ModelError("model stream ended before [DONE]")
        except httpx.TimeoutException as exc:
            raise ModelError(f"model endpoint timed out: {type(exc).__name__}") from exc
        except httpx.HTTPError as exc:
            raise ModelError(f"model endpoint failed: {type(exc).__name__}: {exc}") from exc


def _parse_sse_line(line: str) -> tuple[str, bool]:
    """One SSE line -> (token text, stream finished). Malformed chunks raise ModelError."""
    if not line.startswith("data:"):
        return "", False  # blank separators, comments, event/id fields
    data = line[5:].strip()
    if data == "[DONE]":
        return "", True
    try:
        chunk = orjson.loads(data)
        choice = chunk["choices"][0] if chunk.get("choices") else None
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, IndexError):
        raise ModelError(f"malformed chunk from model endpoint: {data[:120]!r}") from None
    if "error" in chunk:
        raise ModelError(f"model endpoint reported an error: {str(chunk['error'])[:200]}")
    if choice is None:
        return "", False  # e.g. a trailing usage chunk
    if not isinstance(choice, dict):
        raise ModelError(f"malformed chunk from model endpoint: {data[:120]!r}")
    content = (choice.get("delta") or {}).get("content")
    if content is not None and not isinstance(content, str):
        raise ModelError(f"malformed chunk from model endpoint: {data[:120]!r}")
    return content or "", False


@asynccontextmanager
async def open_model(cfg: ModelConfig) -> AsyncIterator[Model]:
    """The configured backend, with its HTTP client if it needs one."""
    if cfg.backend == "fake":
        yield FakeModel(cfg)
        return
    timeout = httpx.Timeout(cfg.idle_timeout, connect=cfg.connect_timeout)
    async with httpx.AsyncClient(timeout=timeout) as client:
        yield OpenAIModel(cfg, client)
