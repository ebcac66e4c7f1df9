"""``localmed serve``: an OpenAI-compatible API on the laptop, over one engine process.

Built on aiohttp (installed with textual-serve for ``chat --web``) rather than llama-cpp-python's
bundled server (whose running request is interrupted by the next one) or FastAPI (three more
packages to install and audit on a clinic laptop): the decoding happens in the engine
(:mod:`localmed.serve.jobs`), so each request only checks its body, is admitted or refused at
once, and relays what the engine streams. Connections are kept alive between requests; a client
that hangs up (streamed reply or not, even while its prompt is prefilled or it waits in the
queue) stops only its own reply, and its slot is free at once; a body must arrive within
:data:`BODY_SECONDS`; at most :data:`MAX_CONNECTIONS` connections are open at once (a further
one gets a 503 and is closed), and idle ones close after :data:`KEEPALIVE_SECONDS`.

Every reply carries the disclaimer: the ``X-Localmed-Disclaimer`` header, and a ``localmed``
object in the JSON (in the first chunk of a stream) with the disclaimer, the model's advisory
and what was served. Requests are logged without their content unless ``--log-content``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import signal
import socket
import ssl
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

from aiohttp import web

from localmed.conversation import DISCLAIMER
from localmed.errors import (
    ContextFullError,
    EngineDiedError,
    GrammarError,
    ImageError,
    LocalmedError,
    ServeError,
    TemplateError,
)
from localmed.images import Image, prompt_parts, read_data_url
from localmed.runtimes.base import GenerationStats
from localmed.runtimes.messages import Done, Event, Failed, Logprobs, Piece, TokenLogprob
from localmed.serve.audit import AuditError, AuditLog, digest
from localmed.serve.documents import ServedDocs
from localmed.serve.jobs import Job, Jobs, ServedModel, ServerBusyError, UnsupportedError
from localmed.serve.keys import KeyRing, RateLimit
from localmed.serve.openai_fields import (
    APIError,
    Chunks,
    ImagePart,
    cache_prompt,
    chat_messages,
    citations,
    completion,
    embedding_inputs,
    embeddings_response,
    logprobs,
    merge_runs,
    model_list,
    response_format,
    sampling,
    seed,
    stop_strings,
)
from localmed.templates import Message

DISCLAIMER_HEADER = "X-Localmed-Disclaimer"
MAX_BODY = 8 * 1024 * 1024
MAX_IMAGE_BODY = 48 * 1024 * 1024
"""The body bound of a server whose model takes images: one image of the largest size taken,
base64-encoded (a 16-bit chest radiograph as PNG can be 10-30 MB)."""
MAX_IMAGES = 16
"""Images one request may carry (each is decoded before the request waits)."""
BODY_SECONDS = 60.0
"""A request body that has not arrived whole by then is refused (408)."""
KEEPALIVE_SECONDS = 75.0
"""An idle kept-alive connection is closed after this (aiohttp's default)."""
MAX_CONNECTIONS = 1024
"""Open connections at most; idle ones cost little, but not nothing."""
ROUTES = ("/v1/chat/completions", "/v1/completions")
HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _Events:
    """A job's events: put by the engine's threads, awaited on the server's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    def put(self, event: Event) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    async def get(self) -> Event:
        return await self._queue.get()


class LocalServer:
    """The bound socket and the routes; :meth:`serve_forever` runs them until interrupted."""

    def __init__(self, sock: socket.socket, *, keys: KeyRing | None, log_content: bool = False,
                 log: TextIO = sys.stderr, tls: ssl.SSLContext | None = None) -> None:
        self.sock = sock
        self.keys = keys
        self.log_content = log_content
        self.log = log
        self.tls = tls
        self.audit: AuditLog | None = None
        self.model_sha256 = ""
        self.rate: RateLimit | None = None
        self.started = int(time.time())
        self.model: ServedModel
        self.jobs: Jobs
        self.docs: ServedDocs | None = None
        """The document index answered from, and the embedding model (``--docs``,
        ``--embed``)."""

    def attach(self, model: ServedModel, jobs: Jobs) -> None:
        self.model = model
        self.jobs = jobs

    # --- running --------------------------------------------------------------------------------

    def app(self) -> web.Application:
        bound = MAX_BODY if self.model.no_images else MAX_IMAGE_BODY
        app = web.Application(client_max_size=bound, middlewares=[self._guard])
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/", self._models)
        for path in ("/", "/health"):
            app.router.add_get(path, self._health)
        for route in ROUTES:
            app.router.add_post(route, self._completion)
            app.router.add_post(route + "/", self._completion)
        if self.docs is not None and self.docs.embedder is not None:
            app.router.add_post("/v1/embeddings", self._embeddings)
            app.router.add_post("/v1/embeddings/", self._embeddings)
        return app

    def serve_forever(self) -> None:
        """Serve until Ctrl-C (or SIGTERM/SIGHUP, raised as an interrupt). A signal that comes
        while the event loop is being made is held until the loop runs, then raised as it would
        have been (raised into a half-made loop, its teardown printed tracebacks)."""
        held: list[int] = []
        originals: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            originals = {sig: signal.signal(sig, lambda signum, _: held.append(signum))
                         for sig in HELD_SIGNALS}
        try:
            asyncio.run(self._serve(held, originals))
        finally:
            restore_signals(originals)  # (the loop's close left SIG_DFL where it had its own)

    async def _serve(self, held: list[int], originals: dict[int, Any]) -> None:
        restore_signals(originals)
        for signum in held:
            handler = signal.getsignal(signum)
            if callable(handler):
                handler(signum, None)
        runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None,
                               keepalive_timeout=KEEPALIVE_SECONDS)
        await runner.setup()
        factory = runner.server
        assert factory is not None

        def connection() -> asyncio.BaseProtocol:  # the bound on open connections
            if len(factory.connections) >= MAX_CONNECTIONS:
                return _Refuse()
            return factory()

        loop = asyncio.get_running_loop()
        # A stop signal is handled in the loop, not raised at whatever bytecode runs when it
        # comes: raised inside a weakref callback, the interrupt was dropped ("Exception
        # ignored in ...") and the server went on serving after SIGTERM.
        stopping = asyncio.Event()
        reload_on_hup = self.keys is not None and self.keys.source is not None
        if originals:  # (the main thread: these signals are the loop's to handle)
            for sig in HELD_SIGNALS:
                if sig == signal.SIGHUP and reload_on_hup:
                    loop.add_signal_handler(sig, self.reload_keys)
                else:
                    loop.add_signal_handler(sig, stopping.set)
        server = await loop.create_server(connection, sock=self.sock, backlog=128,
                                          ssl=self.tls)
        try:
            await stopping.wait()
        finally:
            server.close()
            await runner.cleanup()
        raise KeyboardInterrupt  # as Ctrl-C always ended it: the caller says so and closes

    def reload_keys(self) -> None:
        """SIGHUP: read the key file again; one that no longer reads keeps the keys in use."""
        assert self.keys is not None and self.keys.source is not None
        try:
            self.keys = KeyRing.load(self.keys.source)
        except ServeError as refused:
            print(f"localmed serve: keys not reloaded, the {len(self.keys.keys)} in use kept: "
                  f"{refused}", file=self.log, flush=True)
            return
        print(f"localmed serve: keys reloaded: {', '.join(self.keys.keys)}", file=self.log,
              flush=True)

    def server_close(self) -> None:
        """Close the socket, and the engine if a model was attached."""
        if hasattr(self, "jobs"):
            self.jobs.close()
        if self.docs is not None:
            self.docs.close()
            self.docs = None
        self.sock.close()

    # --- routes ---------------------------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        served = [(self.model.id, self.model.notice())]
        if self.docs is not None and self.docs.embedder is not None:
            served.append((self.docs.embedding_id, {
                "kind": "embedding", "dimensions": self.docs.embedder.dimensions}))
        return _json(200, model_list(served, self.started))

    async def _embeddings(self, request: web.Request) -> web.Response:
        """OpenAI's ``/v1/embeddings`` on the embedding model, texts as they are."""
        assert self.docs is not None
        body = await _body(request)
        model = body.get("model", self.docs.embedding_id)
        if model != self.docs.embedding_id:
            raise APIError(400, f"the embedding model '{model}' is not served here; this "
                           f"server has '{self.docs.embedding_id}'", param="model",
                           code="model_not_found")
        texts, as_base64 = embedding_inputs(body)
        result = await asyncio.to_thread(self.docs.embed, texts)
        if result.truncated:
            raise APIError(400, f"{result.truncated} of the inputs are longer than "
                           f"{self.docs.embedding_id}'s context "
                           f"({self.docs.embedder.n_ctx} tokens)", param="input",  # type: ignore[union-attr]
                           code="context_length_exceeded")
        request["tokens"] = (result.tokens, 0)
        return _json(200, embeddings_response(self.docs.embedding_id, result.vectors,
                                              result.tokens, as_base64))

    async def _health(self, request: web.Request) -> web.Response:
        return _json(200, {"status": "ok", "model": self.model.id,
                           "localmed": self.model.notice()})

    async def _completion(self, request: web.Request) -> web.StreamResponse:
        """Everything that can refuse a request is decided here, before it waits: the body,
        its fields, the template, the schema's grammar, the prompt's length (tokenized beside
        any running decode), then room in the queue."""
        route = request.path.rstrip("/")
        body = await _body(request)
        served, jobs = self.model, self.jobs
        model = body.get("model", served.id)
        if model != served.id:
            raise APIError(400, f"the model '{model}' is not served here; this server has "
                           f"'{served.id}'", param="model", code="model_not_found")
        params = sampling(body, served.defaults)
        top_logprobs = logprobs(body, chat=route == "/v1/chat/completions")
        wants_json, schema = response_format(body)
        images: dict[str, Image] = {}
        if route == "/v1/chat/completions":
            messages, image_parts = chat_messages(body)
            if image_parts:  # refused before a byte of an image is decoded
                if served.no_images:
                    raise APIError(400, f"this model takes no images: {served.no_images}",
                                   param=next(iter(image_parts.values())).param,
                                   code="images_not_supported")
                if len(image_parts) > MAX_IMAGES:
                    raise APIError(400, f"{len(image_parts)} images in one request; up to "
                                   f"{MAX_IMAGES} are taken", param="messages")
                images = await asyncio.to_thread(read_images, image_parts)
            if self.docs is not None and self.docs.retriever is not None:
                messages, grounding = await asyncio.to_thread(
                    self.docs.ground, messages, jobs.tokenize, self._render, jobs.n_ctx,
                    params.max_tokens)
                request["grounding"] = grounding
            prompt = self._render(messages)
            stops = stop_strings(body, served.template.stop)
            kind, where = "chat.completion", "messages"
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise APIError(400, "'prompt' must be a non-empty string", param="prompt")
            stops = stop_strings(body, ())
            kind, where = "text_completion", "prompt"
        caching = cache_prompt(body, served.cache_prompt)
        grammar = await asyncio.to_thread(jobs.json_grammar, schema) if wants_json else None
        parts = prompt_parts(prompt, images)
        tokens = await asyncio.to_thread(jobs.tokenize, parts if images else prompt)
        if len(tokens) >= jobs.n_ctx:
            raise APIError(400, f"this server gives each reply {jobs.n_ctx} tokens of context "
                           f"({jobs.parallel} at once); the prompt has {len(tokens)}",
                           param=where, code="context_length_exceeded")
        request["prompt"] = prompt
        job = Job(prompt, params, stops, tokens, seed(body), grammar, top_logprobs, caching,
                  images=tuple(p for p in parts if isinstance(p, Image)),
                  events=_Events(asyncio.get_running_loop()))  # type: ignore[arg-type]
        jobs.admit(job)
        if self.log_content:
            print(f"localmed serve: {route} content: {json.dumps(body)[:4000]}",
                  file=self.log, flush=True)
        try:
            if body.get("stream"):
                return await self._stream(request, job, kind)
            return await self._complete(request, job, kind)
        except BaseException:  # the client left (the handler is cancelled): stop its reply
            self.jobs.cancel(job)
            raise

    def _render(self, messages: list[Message]) -> str:
        """The template's prompt; consecutive messages of one role merged where the template
        wants turns to alternate."""
        template = self.model.template
        try:
            return template.render(messages)
        except TemplateError as refused:
            merged = merge_runs(messages)
            if len(merged) == len(messages):
                raise APIError(400, str(refused), param="messages") from None
        try:
            return template.render(merged)
        except TemplateError as refused:
            raise APIError(400, str(refused), param="messages") from None

    # --- answers --------------------------------------------------------------------------------

    async def _events(self, job: Job) -> AsyncIterator[Piece | Logprobs | Done]:
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

    async def _complete(self, request: web.Request, job: Job, kind: str) -> web.Response:
        parts: list[str] = []
        entries: list[TokenLogprob] = []
        stats = GenerationStats()
        async for event in self._events(job):
            if isinstance(event, Piece):
                parts.append(event.text)
            elif isinstance(event, Logprobs):
                entries += event.entries
            else:
                stats = event.stats
        text = "".join(parts)
        request["tokens"] = (stats.prompt_tokens, stats.generated_tokens)
        request["reply"] = text
        answer = completion(kind, self.model.id, text, stats,
                            entries if job.logprobs is not None else None, self.model.notice())
        return _json(200, self._cite(request, answer))

    def _cite(self, request: web.Request, answer: dict[str, Any]) -> dict[str, Any]:
        """A response answered from the index: its ``citations`` (the passages given, by
        number) and whether it is grounded."""
        grounding = request.get("grounding")
        if grounding is not None:
            answer["citations"] = citations(grounding.passages)
            answer.setdefault("localmed", {})
            answer["localmed"] = {**answer["localmed"], "docs": grounding.index,
                                  "grounded": grounding.grounded}
        return answer

    async def _stream(self, request: web.Request, job: Job, kind: str) -> web.StreamResponse:
        chunks = Chunks(kind, self.model.id)
        response = web.StreamResponse(status=200, headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            DISCLAIMER_HEADER: DISCLAIMER, "X-Request-Id": request["id"]})
        await response.prepare(request)
        reply: list[str] = []  # for the audit record

        async def event(data: dict[str, Any]) -> None:
            await response.write(b"data: " + json.dumps(data).encode() + b"\n\n")

        try:
            await event(chunks.first(self.model.notice()))
            async for happened in self._events(job):
                if isinstance(happened, Logprobs):
                    chunks.entries += happened.entries
                elif isinstance(happened, Piece):
                    reply.append(happened.text)
                    await event(chunks.piece(happened.text))
                else:
                    stats = happened.stats
                    request["tokens"] = (stats.prompt_tokens, stats.generated_tokens)
                    await event(self._cite(request, chunks.last(stats)))
            await response.write(b"data: [DONE]\n\n")
        except APIError as failed:
            await event(failed.body())
        finally:
            request["reply"] = "".join(reply)
        await response.write_eof()
        return response

    # --- plumbing -------------------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        """Authorization, then every failure as an OpenAI-style error; one log line."""
        started = time.monotonic()
        request["tokens"] = (0, 0)
        request["id"] = uuid.uuid4().hex
        response: web.StreamResponse | None = None
        try:
            self._authorize(request)
            self._admit(request)
            response = await handler(request)
        except APIError as failed:
            headers = {"WWW-Authenticate": "Bearer"} if failed.status == 401 else {}
            if failed.retry_after:
                headers["Retry-After"] = failed.retry_after
            request["refusal"] = failed.message
            response = _json(failed.status, failed.body(), headers)
        except web.HTTPException as http:  # no such route or method
            if http.status in (404, 405):
                failed = APIError(404, f"no such endpoint: {request.method} {request.path}",
                                  code="not_found")
            else:
                failed = APIError(http.status, http.reason)
            response = _json(failed.status, failed.body())
        except ServerBusyError as busy:  # decided at once: nobody waits to hear it
            response = _json(503, APIError(503, str(busy), kind="server_error",
                                           code="server_busy").body(), {"Retry-After": "1"})
        except EngineDiedError as died:  # between requests: the next one reloads it
            response = _json(503, APIError(503, f"{died}; retry the request",
                                           kind="server_error", code="engine_died").body(),
                             {"Retry-After": "5"})
            await asyncio.to_thread(self.jobs.reload, died)
        except LocalmedError as refused:  # the request's fault, in localmed's own sentence
            request["refusal"] = str(refused)
            response = _json(400, refusal(refused).body())
        except (asyncio.CancelledError, ConnectionError):  # the client left
            self._log_request(request, 499, started)
            if self.audit is not None:
                self._audit(request, 499)
            raise
        except Exception as exc:  # never a traceback to the client; the server keeps serving
            print(f"localmed serve: internal error: {type(exc).__name__}: {exc}",
                  file=self.log, flush=True)
            response = _json(500, APIError(500, f"internal error: {type(exc).__name__}",
                                           kind="server_error").body())
        if not response.prepared:  # (a stream's headers went with its first chunk)
            response.headers["X-Request-Id"] = request["id"]
        self._log_request(request, response.status, started)
        if self.audit is not None:  # its fsync off the event loop: other streams go on
            await asyncio.to_thread(self._audit, request, response.status)
        return response

    def _authorize(self, request: web.Request) -> None:
        request["key"] = None
        if self.keys is None:
            return
        name = self.keys.name_of(request.headers.get("Authorization", ""))
        if name is None:
            raise APIError(401, "missing, wrong or revoked API key (Authorization: Bearer …)",
                           code="invalid_api_key")
        request["key"] = name

    def _admit(self, request: web.Request) -> None:
        """Refusals that need no body, decided before anything waits: over the key's request
        rate (429), or an audit log that cannot take the record (503)."""
        if self.rate is not None:
            wait = self.rate.take(request["key"] or str(request.remote))
            if wait:
                raise APIError(429, f"over {self.rate.per_minute} requests a minute for this "
                               f"key; retry in {RateLimit.retry_after(wait)} s",
                               kind="requests", code="rate_limit_exceeded",
                               retry_after=RateLimit.retry_after(wait))
        if self.audit is not None:
            try:
                self.audit.check()
            except AuditError as unaudited:
                raise APIError(503, str(unaudited), kind="server_error",
                               code="audit_unavailable") from None

    def _log_request(self, request: web.Request, status: int, started: float) -> None:
        prompt, generated = request["tokens"]
        when = time.strftime("%d/%b/%Y %H:%M:%S")
        key = f" key={request['key']}" if request.get("key") else ""
        print(f"{when} {request.remote}{key} {request.method} {request.path} {status} "
              f"{prompt}+{generated} tokens {time.monotonic() - started:.2f}s",
              file=self.log, flush=True)

    def _audit(self, request: web.Request, status: int) -> None:
        prompt, reply = request.get("prompt"), request.get("reply")
        record: dict[str, Any] = {
            "event": "request", "request_id": request["id"], "key": request.get("key"),
            "client": request.remote, "method": request.method, "route": request.path,
            "model_sha256": self.model_sha256, "status": status,
            "prompt_tokens": request["tokens"][0], "completion_tokens": request["tokens"][1],
            "prompt_sha256": digest(prompt) if prompt is not None else None,
            "reply_sha256": digest(reply) if reply is not None else None,
            "refusal": request.get("refusal")}
        if (grounding := request.get("grounding")) is not None:
            record["docs"] = grounding.index
            record["passages"] = [
                {"id": n, "passage": p.id, "source": p.source, "page": p.page,
                 "sha256": digest(p.text), **({"text": p.text} if self.log_content else {})}
                for n, p in enumerate(grounding.passages, start=1)]
        if self.log_content:
            record |= {"prompt": prompt, "reply": reply}
        assert self.audit is not None
        try:
            self.audit.append(**record)
        except AuditError as failed:  # the next requests are refused until a write succeeds
            print(f"localmed serve: {failed}", file=self.log, flush=True)


class _Refuse(asyncio.Protocol):
    """A connection over :data:`MAX_CONNECTIONS`: one 503, then closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        body = json.dumps(APIError(503, f"the server has {MAX_CONNECTIONS} connections open; "
                                   "retry shortly", kind="server_error",
                                   code="server_busy").body()).encode()
        transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"  # type: ignore[attr-defined]
                        b"Retry-After: 1\r\nConnection: close\r\nContent-Length: " +
                        str(len(body)).encode() + b"\r\n\r\n" + body)
        transport.close()


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        raw = await asyncio.wait_for(request.read(), BODY_SECONDS)
    except web.HTTPRequestEntityTooLarge:
        raise APIError(413, f"the request body is over {MAX_BODY // (1024 * 1024)} MiB") \
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


def _json(status: int, data: dict[str, Any], headers: dict[str, str] | None = None
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


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine alone (else other machines can reach it)."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (socket.gaierror, UnicodeError):
        raise ServeError(f"--host {host}: not an address or a name this machine can resolve") \
            from None
    return all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def check_host(host: str, keys: KeyRing | None, *, tls: bool, insecure_http: bool) -> None:
    """A host that resolves; beyond loopback only with API keys, and over TLS unless plain
    HTTP is asked for by name."""
    if is_loopback(host):
        return
    if keys is None:
        raise ServeError(f"--host {host} is reachable from other machines: set API keys "
                         "(--api-key-file, --api-key or LOCALMED_API_KEY) to serve beyond this "
                         "laptop")
    if not tls and not insecure_http:
        raise ServeError(f"--host {host} would carry keys and patient text in plain HTTP across "
                         "the network: give a certificate (--tls-cert FILE --tls-key FILE, from "
                         "hospital IT), or make one with --self-signed; --insecure-http to "
                         "serve plain HTTP anyway")


def restore_signals(handlers: dict[int, Any]) -> None:
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def check_not_expired(cert: Path) -> None:
    """Refuse a server certificate past its end date (the first in the file: the server's own,
    before any chain), read with ``cryptography``. A file it cannot read as PEM certificates is
    left to ``load_cert_chain``, which says what is wrong with it."""
    from localmed.serve.tls import not_valid_after

    expires = not_valid_after(cert)
    if expires is not None and expires < dt.datetime.now(dt.timezone.utc):
        raise ServeError(f"--tls-cert {cert}: expired on {expires:%Y-%m-%d %H:%M} UTC; ask for "
                         "a new one")


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context over ``cert`` and ``key`` (PEM), TLS 1.2 and newer; each way they can
    be wrong is one line."""
    for what, path in (("--tls-cert", cert), ("--tls-key", key)):
        if not path.is_file():
            raise ServeError(f"{what} {path}: no such file")
    check_not_expired(cert)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        why = ("the key does not belong to the certificate" if "KEY_VALUES_MISMATCH" in str(exc)
               else f"not a PEM certificate and its key ({exc.reason or exc})")
        raise ServeError(f"--tls-cert {cert} / --tls-key {key}: {why}") from None
    except OSError as exc:
        raise ServeError(f"--tls-cert {cert} / --tls-key {key}: {exc.strerror or exc}") from None
    return context


def bind(host: str, port: int, *, keys: KeyRing | None, log_content: bool = False,
         log: TextIO = sys.stderr, tls: ssl.SSLContext | None = None,
         insecure_http: bool = False) -> LocalServer:
    """Bind before the model loads: a port in use is said in a second, not after a minute."""
    check_host(host, keys, tls=tls is not None, insecure_http=insecure_http)
    if not 0 < port < 65536:
        raise ServeError(f"--port {port}: not a TCP port (1-65535)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
        return LocalServer(sock, keys=keys, log_content=log_content, log=log, tls=tls)
    except PermissionError:
        sock.close()
        raise ServeError(f"port {port}: not allowed for this user (ports below 1024 need "
                         "root); choose --port 8080 or above") from None
    except OSError as exc:
        sock.close()
        if exc.errno in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
            raise ServeError(f"port {port} on {host} is in use (another localmed serve, "
                             "Ollama or LM Studio?); choose another with --port") from None
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
