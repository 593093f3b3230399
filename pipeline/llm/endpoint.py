"""The `endpoint` LLM backend: any OpenAI-compatible `/chat/completions` server (vLLM,
llama.cpp server, Ollama) over HTTP with the standard library, `concurrency` requests at once."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.client import HTTPException
from typing import Any

import numpy as np

from pipeline.errors import ModelMissing
from pipeline.llm.base import LLM, LLMError, Messages, parse_scores


@dataclass(frozen=True)
class EndpointOptions:
    base_url: str = ""  # an OpenAI-compatible server, up to /v1 (vLLM, llama.cpp server, Ollama)
    model: str = ""  # the model name the server knows
    api_key_env: str = ""  # NAME of an environment variable holding the key ("" = no key)
    timeout_s: float = 60.0
    retries: int = 3  # extra attempts after the first, on 5xx/429, timeouts, refused, bad answers
    backoff_s: float = 1.0  # wait before retry k: backoff_s * 2**(k-1)
    concurrency: int = 8  # requests in flight: enrichment batches are at least this big (`LLM.parallel`)
    label_max_tokens: int = 128  # room for the JSON object of scores


class EndpointLLM(LLM):
    """OpenAI-compatible `/chat/completions` over HTTP with the standard library."""

    backend = "endpoint"
    Options = EndpointOptions

    def __init__(self, options: EndpointOptions):
        if options.retries < 0 or options.concurrency < 1 or options.timeout_s <= 0:
            raise ValueError(f"endpoint options out of range: retries, concurrency, timeout_s in {options}")
        super().__init__(options)
        self.url = options.base_url.rstrip("/") + "/chat/completions"

    @property
    def parallel(self) -> int:
        return self.options.concurrency

    def identity(self) -> dict[str, Any]:
        for key in ("base_url", "model"):
            if not getattr(self.options, key):
                raise ModelMissing(option=key, got="", expected=(
                    "the URL of an OpenAI-compatible server up to /v1" if key == "base_url"
                    else "the model name the server serves"))
        return {"backend": self.backend, "base_url": self.options.base_url, "model": self.options.model}

    def load(self, device: str = "cpu") -> "EndpointLLM":
        env = self.options.api_key_env
        if env and not os.environ.get(env):
            raise LLMError(f"api_key_env names ${env}, which is not set in the environment")
        self.device = device
        return self

    def _post(self, body: dict[str, Any]) -> str:
        headers = {"Content-Type": "application/json"}
        if self.options.api_key_env:  # read per request: the key is never stored
            headers["Authorization"] = f"Bearer {os.environ.get(self.options.api_key_env, '')}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.options.timeout_s) as response:
            return json.loads(response.read())["choices"][0]["message"]["content"]

    def _ask(self, messages: Messages, max_tokens: int, labels: tuple[str, ...] | None) -> Any:
        body: dict[str, Any] = {"model": self.options.model, "messages": messages,
                                "max_tokens": max_tokens, "temperature": 0}
        if labels:
            body["response_format"] = {"type": "json_object"}
        reason, attempt = "", 0
        for attempt in range(1, self.options.retries + 2):
            if attempt > 1:
                time.sleep(self.options.backoff_s * 2 ** (attempt - 2))
            try:
                content = self._post(body)
                return parse_scores(content, labels) if labels else content.strip()
            except urllib.error.HTTPError as err:
                reason = f"HTTP {err.code} {err.reason}"
                if 400 <= err.code < 500 and err.code not in (408, 429):
                    break  # a bad request or a wrong key does not get better by asking again
            except (urllib.error.URLError, TimeoutError, ConnectionError, HTTPException) as err:
                reason = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
            except (ValueError, KeyError, IndexError, TypeError, AttributeError) as err:
                reason = f"bad answer: {type(err).__name__}: {err}"
        raise LLMError(f"{self.url}: {reason} (after {attempt} attempt(s))")

    def _map(self, batch: list[Messages], max_tokens: int, labels: tuple[str, ...] | None,
             keep_errors: bool = False) -> list[Any]:
        def one(messages: Messages) -> Any:
            try:
                return self._ask(messages, max_tokens, labels)
            except LLMError as err:
                if keep_errors:
                    return err
                raise

        with ThreadPoolExecutor(max_workers=self.options.concurrency) as pool:
            return list(pool.map(one, batch))

    def chat(self, batch: list[Messages], max_new_tokens: int) -> list[str | LLMError]:
        """Requests are independent: one that fails after its retries is returned as its LLMError,
        in its place, and the others' answers stand (asking them again would double the load)."""
        return self._map(batch, max_new_tokens, None, keep_errors=True)

    def label_probs(self, batch: list[Messages], labels: tuple[str, ...]) -> np.ndarray:
        ask = ("\n\nReply with one JSON object only, mapping each of these labels to a score >= 0 "
               f"(higher = more likely): {', '.join(labels)}.")
        # the instruction follows the data block; the system message stays the template verbatim
        batch = [m[:-1] + [{**m[-1], "content": m[-1]["content"] + ask}] for m in batch]
        return np.stack(self._map(batch, self.options.label_max_tokens, tuple(labels)))
