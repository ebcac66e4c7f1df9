"""The OpenAI API's request fields and error shape, checked at the boundary.

What ``localmed serve`` accepts, as plain functions over the decoded JSON body: each field is
checked once, and a bad one is an :class:`APIError` (HTTP 400 with OpenAI's error body) that names
it. What it answers is written here too: a whole completion, the chunks of a streamed one, usage.
No HTTP here.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Sequence
from typing import Any

from localmed.images import image_marker, new_nonce
from localmed.runtimes.base import GenerationParams, GenerationStats, StopReason
from localmed.runtimes.messages import TokenLogprob
from localmed.templates import Message

ROLES = ("system", "user", "assistant")


class APIError(Exception):
    """An OpenAI-style error answer: HTTP status and ``{"error": {...}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error",
                 retry_after: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = \
            status, message, param, code, kind
        self.retry_after = retry_after
        """Seconds, for a Retry-After header (429, 503)."""

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


def _number(body: dict[str, Any], key: str, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise APIError(400, f"'{key}' must be a number from {low} to {high}", param=key)
    return float(value)


def sampling(body: dict[str, Any], defaults: GenerationParams) -> GenerationParams:
    """OpenAI's sampling fields (and llama.cpp's top_k, min_p, repeat_penalty) over the
    model's defaults."""
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise APIError(400, "'max_tokens' must be a positive integer", param="max_tokens")
    refuse_unsupported(body)
    values = {
        "max_tokens": limit,
        "temperature": _number(body, "temperature", 0, 2),
        "top_p": _number(body, "top_p", 0, 1),
        "min_p": _number(body, "min_p", 0, 1),
        "repeat_penalty": _number(body, "repeat_penalty", 0, 10),
        "frequency_penalty": _number(body, "frequency_penalty", -2, 2),
        "presence_penalty": _number(body, "presence_penalty", -2, 2),
    }
    ignore_eos = body.get("ignore_eos", False)  # llama.cpp server's extension (benchmarks)
    if not isinstance(ignore_eos, bool):
        raise APIError(400, "'ignore_eos' must be true or false", param="ignore_eos")
    values["ignore_eos"] = ignore_eos or None
    top_k = body.get("top_k")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise APIError(400, "'top_k' must be a non-negative integer", param="top_k")
        values["top_k"] = top_k
    return dataclasses.replace(defaults, **{k: v for k, v in values.items() if v is not None})


UNSUPPORTED = {
    "tools": "tool calls are not supported by localmed serve",
    "tool_choice": "tool calls are not supported by localmed serve",
    "functions": "function calls are not supported by localmed serve",
    "function_call": "function calls are not supported by localmed serve",
    "logit_bias": "'logit_bias' is not supported",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
}
"""Fields that would change the answer and that localmed does not honour: refused, never
dropped. Their empty or off values (``tools: []``, ``logprobs: false``) pass."""


def refuse_unsupported(body: dict[str, Any]) -> None:
    for key, why in UNSUPPORTED.items():
        value = body.get(key)
        if value in (None, False, [], {}) or (key == "tool_choice" and value in ("none", "auto")):
            continue  # absent, off or empty: nothing asked that is not given
        raise APIError(400, f"{why}; remove '{key}' from the request", param=key,
                       code="unsupported_parameter")
    n = body.get("n", 1)
    if n != 1:
        raise APIError(400, "only n=1 is supported: one reply per request", param="n",
                       code="unsupported_parameter")


def logprobs(body: dict[str, Any], *, chat: bool) -> int | None:
    """How many alternatives to report with each token's log probability (OpenAI's chat
    ``logprobs: true`` and ``top_logprobs`` 0-20); None when not asked for."""
    wanted, top = body.get("logprobs"), body.get("top_logprobs")
    if not chat:
        if wanted not in (None, False, 0):
            raise APIError(400, "'logprobs' on /v1/completions is not supported; use "
                           "/v1/chat/completions with logprobs: true", param="logprobs",
                           code="unsupported_parameter")
        return None
    if wanted is not None and not isinstance(wanted, bool):
        raise APIError(400, "'logprobs' must be true or false", param="logprobs")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20:
            raise APIError(400, "'top_logprobs' must be an integer from 0 to 20",
                           param="top_logprobs")
        if not wanted:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return (top or 0) if wanted else None


def seed(body: dict[str, Any]) -> int | None:
    value = body.get("seed")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, "'seed' must be an integer", param="seed")
    return value


def response_format(body: dict[str, Any]) -> tuple[bool, dict[str, Any] | None]:
    """(whether the reply must be JSON, its schema if one is given)."""
    value = body.get("response_format")
    if value is None:
        return False, None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return False, None
    if kind == "json_object":
        return True, None
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise APIError(400, "response_format json_schema needs 'json_schema': {'name': …, "
                           "'schema': {…}}", param="response_format.json_schema")
        return True, schema
    raise APIError(400, "'response_format' type must be 'text', 'json_object' or "
                   "'json_schema'", param="response_format.type", code="unsupported_parameter")


def stop_strings(body: dict[str, Any], template_stops: tuple[str, ...]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return template_stops
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or \
            not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")
    return (*template_stops, *stops)


@dataclasses.dataclass(frozen=True)
class ImagePart:
    """An ``image_url`` content part, read later (off the event loop): its URL and where it
    was in the request."""

    url: Any
    param: str


def chat_messages(body: dict[str, Any]) -> tuple[list[Message], dict[str, ImagePart]]:
    """The request's messages, each ``image_url`` part as a marker in its text (the template
    places it; :func:`localmed.images.prompt_parts` finds it after), and those parts by
    marker."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    images: dict[str, ImagePart] = {}
    nonce = new_nonce()
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise APIError(400, f"messages[{i}]: 'role' must be one of {', '.join(ROLES)}",
                           param=f"messages[{i}].role")
        content = message.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, {"type": "image_url"…
            texts: list[str] = []
            for j, part in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif kind == "image_url" and message["role"] == "user":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    marker = image_marker(nonce, len(images))
                    images[marker] = ImagePart(url, f"{where}.image_url")
                    texts.append(marker)
                else:
                    raise APIError(400, f"{where}: a content part must be text, or an "
                                   "image_url in a user message", param=where)
            content = "".join(texts)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}]: 'content' must be text",
                           param=f"messages[{i}].content")
        out.append(Message(message["role"], content))
    return out, images


def merge_runs(messages: list[Message]) -> list[Message]:
    """Consecutive messages of one role as one (blank line between): for templates that
    require turns to alternate, as chat folds a system prompt into a template without one."""
    out: list[Message] = []
    for message in messages:
        if out and out[-1].role == message.role:
            out[-1] = Message(message.role, f"{out[-1].content}\n\n{message.content}")
        else:
            out.append(message)
    return out


def finish_reason(stats: GenerationStats) -> str:
    return "length" if stats.stopped_by in (StopReason.LENGTH, StopReason.CONTEXT) else "stop"


def cache_prompt(body: dict[str, Any], allowed: bool) -> bool:
    """llama-server's ``cache_prompt`` (default true): whether the reply may continue from a
    slot's cells that hold the prompt's beginning; never where the server turned it off."""
    value = body.get("cache_prompt", True)
    if not isinstance(value, bool):
        raise APIError(400, "'cache_prompt' must be true or false", param="cache_prompt")
    return value and allowed


def usage(stats: GenerationStats) -> dict[str, Any]:
    """OpenAI's usage object; ``cached_tokens``: prompt tokens not prefilled again."""
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": stats.prompt_tokens + stats.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens}}


# --- the answers ------------------------------------------------------------------------------------


def head(kind: str, model_id: str) -> dict[str, Any]:
    """The fields every completion object and chunk of one reply shares (``kind``: OpenAI's
    ``object``, such as ``chat.completion``)."""
    prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": kind,
            "created": int(time.time()), "model": model_id}


def model_list(models: Sequence[tuple[str, dict[str, Any]]], created: int) -> dict[str, Any]:
    """``GET /v1/models``: each model served (its id, and what localmed says of it)."""
    return {"object": "list", "data": [
        {"id": model_id, "object": "model", "created": created, "owned_by": "localmed",
         "localmed": about} for model_id, about in models]}


def logprob_content(entries: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    """OpenAI's ``logprobs.content``: an item per token, with its ``top_logprobs``."""
    def item(entry: TokenLogprob) -> dict[str, Any]:
        return {"token": entry.token, "logprob": entry.logprob, "bytes": list(entry.bytes)}

    return [{**item(entry), "top_logprobs": [item(alt) for alt in entry.top]}
            for entry in entries]


def completion(kind: str, model_id: str, text: str, stats: GenerationStats,
               entries: Sequence[TokenLogprob] | None, notice: dict[str, Any]
               ) -> dict[str, Any]:
    """A whole reply: ``chat.completion`` (``entries``: its tokens' log probabilities, None
    when not asked for) or ``text_completion``."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason(stats)}
    if kind == "chat.completion":
        choice["message"] = {"role": "assistant", "content": text}
        choice["logprobs"] = {"content": logprob_content(entries)} if entries is not None \
            else None
    else:
        choice |= {"text": text, "logprobs": None}
    return {**head(kind, model_id), "choices": [choice], "usage": usage(stats),
            "localmed": notice}


class Chunks:
    """The chunks of one streamed reply, each a ``data:`` line's object: the first (with the
    role, and localmed's notice), then one per piece of text, then the last (finish reason
    and usage)."""

    def __init__(self, kind: str, model_id: str) -> None:
        self.chat = kind == "chat.completion"
        self.head = head("chat.completion.chunk" if self.chat else kind, model_id)
        self.entries: list[TokenLogprob] = []
        """Log probabilities of the tokens whose text the next chunk carries."""

    def _choice(self, text: str | None, reason: str | None, first: bool = False
                ) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        out = {"index": 0, "delta": delta, "finish_reason": reason}
        if self.entries:
            out["logprobs"] = {"content": logprob_content(self.entries)}
            self.entries.clear()
        return out

    def first(self, notice: dict[str, Any]) -> dict[str, Any]:
        return {**self.head, "choices": [self._choice("", None, True)], "localmed": notice}

    def piece(self, text: str) -> dict[str, Any]:
        return {**self.head, "choices": [self._choice(text, None)]}

    def last(self, stats: GenerationStats) -> dict[str, Any]:
        return {**self.head, "choices": [self._choice(None, finish_reason(stats))],
                "usage": usage(stats)}


# --- documents and embeddings ---------------------------------------------------------------------

MAX_EMBEDDING_INPUTS = 2048
"""Texts one ``/v1/embeddings`` request may carry (OpenAI's bound)."""


def citations(passages: Sequence[Any]) -> list[dict[str, Any]]:
    """The response's top-level ``citations``: each passage given, by its number in the
    prompt (``[n]`` in the reply)."""
    return [{"id": n, "source": p.source, "page": p.page, "text": p.text,
             "score": round(p.score, 6)} for n, p in enumerate(passages, start=1)]


def embedding_inputs(body: dict[str, Any]) -> tuple[list[str], bool]:
    """``/v1/embeddings``' texts, and whether the vectors go back as base64 (the ``openai``
    client asks for that by default) rather than lists of floats."""
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts:
        raise APIError(400, "'input' must be a string or a non-empty list of strings",
                       param="input")
    if len(texts) > MAX_EMBEDDING_INPUTS:
        raise APIError(400, f"{len(texts)} inputs; up to {MAX_EMBEDDING_INPUTS} are taken",
                       param="input")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise APIError(400, f"input[{i}]: token arrays are not taken here; send text",
                           param="input", code="unsupported_parameter")
        if not text.strip():
            raise APIError(400, f"input[{i}] is empty", param="input")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise APIError(400, "'encoding_format' must be 'float' or 'base64'",
                       param="encoding_format")
    if body.get("dimensions") is not None:
        raise APIError(400, "'dimensions' is not supported: the model's own vector size is "
                       "returned", param="dimensions", code="unsupported_parameter")
    return texts, encoding == "base64"


def embeddings_response(model_id: str, vectors: Any, tokens: int, base64: bool
                        ) -> dict[str, Any]:
    """OpenAI's ``list`` of ``embedding`` objects, with usage."""
    import base64 as b64

    import numpy as np

    data = []
    for i, vector in enumerate(vectors):
        array = np.asarray(vector, dtype="<f4")
        value: Any = b64.b64encode(array.tobytes()).decode("ascii") if base64 else \
            [float(x) for x in array]
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {"object": "list", "data": data, "model": model_id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
