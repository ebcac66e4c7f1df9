"""A request's HTTP side in ``localmed serve``: its body read (bounded in size and time), its answer
written (one JSON response, or a stream of server-sent events), every failure as an OpenAI-style
error, and the disclaimer on each.

Every reply carries the disclaimer: the ``X-Localmed-Disclaimer`` header, and a ``localmed``
object in the JSON (in the first chunk of a stream) with the disclaimer, the model's advisory
and what was served; an answer from the clinic's documents carries its ``citations``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from localmed.conversation import DISCLAIMER
from localmed.errors import (
    ContextFullError,
    EngineDiedError,
    GrammarError,
    ImageError,
    LocalmedError,
    TemplateError,
)
from localmed.images import Image, read_data_url
from localmed.runtimes.base import GenerationStats
from localmed.runtimes.messages import Done, Failed, Logprobs, Piece, TokenLogprob
from localmed.serve.jobs import Job, ServedModel, UnsupportedError
from localmed.serve.openai_fields import APIError, Chunks, ImagePart, citations, completion

DISCLAIMER_HEADER = "X-Localmed-Disclaimer"
BODY_SECONDS = 60.0
"""A request body that has not arrived whole by then is refused (408)."""
MAX_CONNECTIONS = 1024
"""Open connections at most; idle ones cost little, but not nothing."""


class Refuse(asyncio.Protocol):
    """A connection over :data:`MAX_CONNECTIONS`: one 503, then closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        body = json.dumps(APIError(503, f"the server has {MAX_CONNECTIONS} connections open; "
                                   "retry shortly", kind="server_error",
                                   code="server_busy").body()).encode()
        transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"  # type: ignore[attr-defined]
                        b"Retry-After: 1\r\nConnection: close\r\nContent-Length: " +
                        str(len(body)).encode() + b"\r\n\r\n" + body)
        transport.close()


async def read_body(request: web.Request) -> dict[str, Any]:
    try:
        raw = await asyncio.wait_for(request.read(), BODY_SECONDS)
    except web.HTTPRequestEntityTooLarge as large:
        raise APIError(413, f"the request body is over {large.max_size // (1024 * 1024)} MiB") \
            from None
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {BODY_SECONDS:.0f} s") \
            from None
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    return body


def json_response(status: int, data: dict[str, Any], headers: dict[str, str] | None = None
                  ) -> web.Response:
    return web.Response(status=status, body=json.dumps(data).encode(),
                        content_type="application/json",
                        headers={DISCLAIMER_HEADER: DISCLAIMER, **(headers or {})})


def read_images(parts: dict[str, ImagePart]) -> dict[str, Image]:
    """Each ``image_url`` part's image, by marker: a 400 that names the part for any that is
    not a whole PNG, JPEG or WebP in a ``data:`` URL."""
    images = {}
    for n, (marker, part) in enumerate(parts.items()):
        try:
            images[marker] = read_data_url(part.url, f"image {n + 1}")
        except ImageError as refused:
            raise APIError(400, str(refused), param=part.param, code="invalid_image") from None
    return images


def refusal(error: LocalmedError) -> APIError:
    """A localmed error in a request's path as the 400 that names what it was about."""
    if isinstance(error, ContextFullError):
        param, code = None, "context_length_exceeded"
    elif isinstance(error, UnsupportedError):
        param, code = None, "unsupported_parameter"
    elif isinstance(error, GrammarError):
        param, code = "response_format.json_schema.schema", "invalid_json_schema"
    elif isinstance(error, TemplateError):
        param, code = "messages", None
    else:
        param, code = None, None
    return APIError(400, str(error), param=param, code=code)


async def events(job: Job) -> AsyncIterator[Piece | Logprobs | Done]:
    """A job's events as the engine sends them, to its Done; a failure raised as its
    :class:`APIError`."""
    while True:
        event = await job.events.get()  # type: ignore[misc]
        if isinstance(event, Failed):
            error = event.error
            if isinstance(error, EngineDiedError):
                raise APIError(503, f"{error}; it is being reloaded, retry the request",
                               kind="server_error", code="engine_died")
            if isinstance(error, LocalmedError):
                raise refusal(error)
            raise APIError(500, "the model engine failed on this request",
                           kind="server_error")
        yield event  # type: ignore[misc]
        if isinstance(event, Done):
            return


def noted(request: web.Request, stats: GenerationStats) -> None:
    """What the server's log line and audit record say of a reply: its tokens, and the drafted
    tokens the model took."""
    request["tokens"] = (stats.prompt_tokens, stats.generated_tokens)
    request["drafts"] = (stats.accepted_tokens, stats.drafted_tokens)


async def complete(request: web.Request, job: Job, kind: str, model: ServedModel
                   ) -> web.Response:
    """The whole reply in one JSON response."""
    parts: list[str] = []
    entries: list[TokenLogprob] = []
    stats = GenerationStats()
    async for event in events(job):
        if isinstance(event, Piece):
            parts.append(event.text)
        elif isinstance(event, Logprobs):
            entries += event.entries
        else:
            stats = event.stats
    text = "".join(parts)
    noted(request, stats)
    request["reply"] = text
    answer = completion(kind, model.id, text, stats,
                        entries if job.logprobs is not None else None, model.notice())
    return json_response(200, cite(request, answer))


def cite(request: web.Request, answer: dict[str, Any]) -> dict[str, Any]:
    """A response answered from the index: its ``citations`` (the passages given, by number)
    and whether it is grounded."""
    grounding = request.get("grounding")
    if grounding is not None:
        answer["citations"] = citations(grounding.passages)
        answer.setdefault("localmed", {})
        answer["localmed"] = {**answer["localmed"], "docs": grounding.index,
                              "grounded": grounding.grounded}
    return answer


async def stream(request: web.Request, job: Job, kind: str, model: ServedModel
                 ) -> web.StreamResponse:
    """The reply as server-sent events, a chunk per piece; a failure midway as an error
    event."""
    chunks = Chunks(kind, model.id)
    response = web.StreamResponse(status=200, headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
        DISCLAIMER_HEADER: DISCLAIMER, "X-Request-Id": request["id"]})
    await response.prepare(request)
    reply: list[str] = []  # for the audit record

    async def event(data: dict[str, Any]) -> None:
        await response.write(b"data: " + json.dumps(data).encode() + b"\n\n")

    try:
        await event(chunks.first(model.notice()))
        async for happened in events(job):
            if isinstance(happened, Logprobs):
                chunks.entries += happened.entries
            elif isinstance(happened, Piece):
                reply.append(happened.text)
                await event(chunks.piece(happened.text))
            else:
                stats = happened.stats
                noted(request, stats)
                await event(cite(request, chunks.last(stats)))
        await response.write(b"data: [DONE]\n\n")
    except APIError as failed:
        await event(failed.body())
    finally:
        request["reply"] = "".join(reply)
    await response.write_eof()
    return response
