"""The agent's LLM: any OpenAI-compatible chat-completions endpoint with tool calling, over plain HTTP.

One request per turn (`messages` + `tools`), the reply's message returned as a dict. Transport
failures (refused connection, timeout, HTTP 429/5xx, a body that is not JSON) are retried with
backoff; what still fails is an `EndpointError` whose message names the URL and the cause, so the
loop can record it and stop with its transcript intact. The key is read from an environment
variable (never from a config file, which is saved beside the results).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from neurodiff_jax.diffing.graders import chat_completions_url
from neurodiff_jax.utils.config import ConfigError

KEY_ENV = "NEURODIFF_AGENT_KEY"
_RETRY_CODES = (408, 409, 429, 500, 502, 503, 504)


class EndpointError(RuntimeError):
  """The endpoint did not give a usable reply after the retries: the message names the URL and why."""


class ChatClient:
  """Chat completions with tools at `base_url` for `model` (key from `$key_env`, if set)."""

  def __init__(self, base_url: str, model: str, *, key_env: str = KEY_ENV, timeout_s: float = 60.0,
               retries: int = 2, backoff_s: float = 1.0, temperature: float = 0.0, max_tokens: int = 1024,
               sleep: Callable[[float], None] = time.sleep):
    if not base_url or not model:
      raise ConfigError("an LLM agent needs --config.llm.base_url=URL (an OpenAI-compatible server, e.g. "
                        "http://localhost:8000/v1) and --config.llm.model=NAME; or --config.agents='(\"diff_reader\","
                        "\"blackbox_reader\")' for the offline agents.")
    self.url, self.model = chat_completions_url(base_url), str(model)
    self.key_env, self.timeout_s, self.retries = key_env, float(timeout_s), int(retries)
    self.backoff_s, self.temperature, self.max_tokens = float(backoff_s), float(temperature), int(max_tokens)
    self._sleep = sleep

  def _post(self, body: dict[str, Any]) -> dict[str, Any]:
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(self.key_env)
    if key:
      headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
      return json.loads(response.read().decode())

  def complete(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None,
               seed: int | None = None) -> dict[str, Any]:
    """The assistant message (`content`, `tool_calls`) the endpoint returns for `messages`; EndpointError if none."""
    body: dict[str, Any] = {"model": self.model, "messages": list(messages), "temperature": self.temperature,
                            "max_tokens": self.max_tokens}
    if tools:
      body["tools"] = list(tools)
      body["tool_choice"] = "auto"
    if seed is not None:
      body["seed"] = int(seed)
    last = ""
    for attempt in range(self.retries + 1):
      if attempt:
        self._sleep(self.backoff_s * 2 ** (attempt - 1))
      try:
        reply = self._post(body)
      except urllib.error.HTTPError as e:
        hint = f" (is ${self.key_env} set to a valid key?)" if e.code in (401, 403) else ""
        last = f"HTTP {e.code} {e.reason}{hint}"
        if e.code not in _RETRY_CODES:
          break
        continue
      except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
        last = f"no answer ({getattr(e, 'reason', e)}; timeout {self.timeout_s:g} s)"
        continue
      except (json.JSONDecodeError, UnicodeDecodeError):
        last = "a reply that is not JSON (is it an OpenAI-compatible chat-completions server?)"
        continue
      try:
        message = reply["choices"][0]["message"]
        if not isinstance(message, dict):
          raise TypeError
      except (KeyError, IndexError, TypeError):
        last = f"a reply without choices[0].message ({str(reply)[:200]})"
        continue
      return {"content": message.get("content") or "", "tool_calls": message.get("tool_calls") or [],
              "usage": reply.get("usage") or {}}
    raise EndpointError(f"agent endpoint {self.url} (model {self.model}): {last} after {self.retries + 1} "
                        "attempt(s); the transcript so far is saved and a rerun resumes from it.")


__all__ = ["KEY_ENV", "ChatClient", "EndpointError"]
