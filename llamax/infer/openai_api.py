"""The OpenAI API's request checks and response shapes (completions and chat completions).

Requests are checked field by field against what OpenAI accepts, so a client mistake gets a 400
naming the field (`{"error": {"message", "type", "param", "code"}}`) instead of a server error or
a silent default. OpenAI fields that llamax does not implement are accepted only at their neutral
value (e.g. `presence_penalty: 0`); unknown fields are refused, as OpenAI refuses them.
"""
from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

from llamax.infer.row_sampling import TOP_LOGPROBS

MAX_STOP_STRINGS = 16
MAX_CHOICES = 64
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """An error answered with an OpenAI-style JSON body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """A checked completions or chat request."""

    prompts: tuple  # completions: str or token-id lists; chat: one tuple of messages
    max_tokens: int | None  # None: the rest of the context (chat's default)
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    n: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    logprobs: int | None  # alternatives per token, None = no logprobs
    echo: bool = False


_NUMBER = (int, float)
_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "an array",
          dict: "an object", type(None): "null"}


def _check(body: dict, name: str, kinds: tuple, default: Any = None) -> Any:
    """body[name] if it has one of `kinds` (bool is not a number here), else ApiError 400."""
    if name not in body or body[name] is None:
        return default
    value = body[name]
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        expected = " or ".join(dict.fromkeys(_NAMES[k] for k in kinds))
        raise ApiError(400, f"'{name}' must be {expected}, got {type(value).__name__} {value!r:.40}",
                       param=name, code="invalid_type")
    return value


def _range(name: str, value: Any, low: float, high: float, low_open: bool = False) -> Any:
    if value is not None and (value < low or value > high or (low_open and value == low)):
        bracket = "(" if low_open else "["
        raise ApiError(400, f"'{name}' must be in {bracket}{low}, {high}], got {value!r}",
                       param=name, code="invalid_value")
    return value


def _neutral(body: dict, name: str, kinds: tuple, neutral: Any) -> None:
    """An OpenAI field llamax does not implement: accepted at its neutral value only."""
    value = _check(body, name, kinds)
    if value is not None and value != neutral:
        raise ApiError(400, f"'{name}' is not supported by this server (only {neutral!r})",
                       param=name, code="unsupported_parameter")


_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "n", "stop", "stream",
           "stream_options", "user", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs"}
_COMPLETION_ONLY = {"prompt", "echo", "suffix", "best_of"}
_CHAT_ONLY = {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
              "tool_choice", "parallel_tool_calls", "functions", "function_call", "metadata", "store"}


def _common(body: Any, allowed: set, max_tokens_default: int | None) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, f"unrecognized request argument supplied: {unknown[0]}", param=unknown[0],
                       code="unknown_parameter")
    _check(body, "model", (str,))
    _check(body, "user", (str,))
    _neutral(body, "presence_penalty", _NUMBER, 0)
    _neutral(body, "frequency_penalty", _NUMBER, 0)
    _neutral(body, "logit_bias", (dict,), {})
    stop = _check(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP_STRINGS} "
                       "non-empty strings", param="stop", code="invalid_value")
    stream_options = _check(body, "stream_options", (dict,), {})
    if set(stream_options) - {"include_usage"}:
        raise ApiError(400, "'stream_options' accepts only 'include_usage'", param="stream_options")
    top_k = _check(body, "top_k", (int,), 0)
    return dict(
        max_tokens=_range("max_tokens", _check(body, "max_tokens", (int,), max_tokens_default), 1, 1 << 30),
        temperature=float(_range("temperature", _check(body, "temperature", _NUMBER, 1.0), 0, 2)),
        top_p=float(_range("top_p", _check(body, "top_p", _NUMBER, 1.0), 0, 1, low_open=True)),
        top_k=0 if top_k == -1 else _range("top_k", top_k, 0, 1 << 30),
        seed=_range("seed", _check(body, "seed", (int,)), -(1 << 63), (1 << 63) - 1),
        n=_range("n", _check(body, "n", (int,), 1), 1, MAX_CHOICES),
        stop=tuple(stop), stream=_check(body, "stream", (bool,), False),
        include_usage=bool(_check({"include_usage": stream_options.get("include_usage")},
                                  "include_usage", (bool,), False)))


def parse_completion(body: Any) -> GenerationRequest:
    """Checks a /v1/completions body."""
    fields = _common(body, _COMMON | _COMPLETION_ONLY, 16)
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError(400, "'prompt' is required", param="prompt", code="missing_required_parameter")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and _is_ids(prompt)):
        prompts = (prompt,)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_ids(p) for p in prompt):
        prompts = tuple(prompt)
    else:
        raise ApiError(400, "'prompt' must be a string, an array of strings, an array of token ids "
                       "or an array of token-id arrays (non-empty)", param="prompt", code="invalid_type")
    if any(p == "" or p == [] for p in prompts):
        raise ApiError(400, "'prompt' must not be empty", param="prompt", code="invalid_value")
    _neutral(body, "suffix", (str,), "")
    best_of = _check(body, "best_of", (int,))
    if best_of is not None and best_of != fields["n"]:
        raise ApiError(400, "'best_of' other than n is not supported", param="best_of",
                       code="unsupported_parameter")
    logprobs = _range("logprobs", _check(body, "logprobs", (int,)), 0, TOP_LOGPROBS)
    echo = _check(body, "echo", (bool,), False)
    if echo and logprobs is not None:
        raise ApiError(400, "'echo' with 'logprobs' (prompt log-probabilities) is not supported",
                       param="echo", code="unsupported_parameter")
    return GenerationRequest(prompts=prompts, logprobs=logprobs, echo=echo, **fields)


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)


def parse_chat(body: Any) -> GenerationRequest:
    """Checks a /v1/chat/completions body; prompts holds one tuple of {role, content} dicts."""
    fields = _common(body, _COMMON | _CHAT_ONLY, None)
    limit = _check(body, "max_completion_tokens", (int,))
    if limit is not None:
        fields["max_tokens"] = _range("max_completion_tokens", limit, 1, 1 << 30)
    messages = _check(body, "messages", (list,))
    if messages is None:
        raise ApiError(400, "'messages' is required", param="messages", code="missing_required_parameter")
    if not messages:
        raise ApiError(400, "'messages' must hold at least one message", param="messages",
                       code="invalid_value")
    checked = tuple(_message(m, i) for i, m in enumerate(messages))
    want_logprobs = _check(body, "logprobs", (bool,), False)
    top = _range("top_logprobs", _check(body, "top_logprobs", (int,), 0), 0, TOP_LOGPROBS)
    response_format = _check(body, "response_format", (dict,), {"type": "text"})
    if response_format.get("type") != "text":
        raise ApiError(400, "only response_format {'type': 'text'} is supported",
                       param="response_format", code="unsupported_parameter")
    for name in ("tools", "functions"):
        if _check(body, name, (list,)):
            raise ApiError(400, f"'{name}' (function calling) is not supported by this server",
                           param=name, code="unsupported_parameter")
    return GenerationRequest(prompts=(checked,), logprobs=top if want_logprobs else None, **fields)


def _message(message: Any, index: int) -> dict:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise ApiError(400, f"{param} must be an object with 'role' and 'content'", param=param,
                       code="invalid_type")
    role = message.get("role")
    if role not in ROLES:
        raise ApiError(400, f"{param}.role must be one of {sorted(ROLES)}, got {role!r:.40}",
                       param=f"{param}.role", code="invalid_value")
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text parts can be read
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise ApiError(400, f"{param}.content: only text parts ({{'type': 'text', 'text': ...}}) "
                           "are supported", param=f"{param}.content", code="invalid_value")
        content = "".join(p["text"] for p in content)
    if content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise ApiError(400, f"{param}.content must be a string, got {type(content).__name__}",
                       param=f"{param}.content", code="invalid_type")
    return {"role": ROLES[role], "content": content}


# ---- responses ----------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(kind: str, response_id: str, model: str, choices: list, usage_: dict | None) -> dict:
    """The fields every (chunk) response shares; `usage` is omitted when None."""
    out = {"id": response_id, "object": kind, "created": int(time.time()), "model": model,
           "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def completion_logprobs(tokens: list[str], logprobs: list[float], top: list[dict],
                        offsets: list[int]) -> dict:
    """The legacy completions `logprobs` object."""
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(tokens: list[str], logprobs: list[float], top: list[list[tuple[str, float]]]) -> dict:
    """The chat `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    return {"content": [
        {"token": t, "logprob": p, "bytes": list(t.encode("utf-8")),
         "top_logprobs": [{"token": a, "logprob": q, "bytes": list(a.encode("utf-8"))} for a, q in alts]}
        for t, p, alts in zip(tokens, logprobs, top)]}
