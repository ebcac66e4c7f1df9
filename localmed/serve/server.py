"""``localmed serve``: an OpenAI-compatible API on the laptop, over one engine process.

Built on aiohttp (installed with textual-serve for ``chat --web``) rather than llama-cpp-python's
bundled server (whose running request is interrupted by the next one) or FastAPI (three more
packages to install and audit on a clinic laptop): the decoding happens in the engine
(:mod:`localmed.serve.jobs`), so each request only checks its body, is admitted or refused at
once, and relays what the engine streams (:mod:`localmed.serve.wire`: bodies read, answers
written, the disclaimer on each). Connections are kept alive between requests; a client that
hangs up (streamed reply or not, even while its prompt is prefilled or it waits in the queue)
stops only its own reply, and its slot is free at once; a body must arrive within
:data:`~localmed.serve.wire.BODY_SECONDS`; at most
:data:`~localmed.serve.wire.MAX_CONNECTIONS` connections are open at once (a further one gets
a 503 and is closed), and idle ones close after :data:`KEEPALIVE_SECONDS`.

Requests are logged without their content unless ``--log-content``; with ``--audit-log`` each
is a record of the hash-chained trail (:mod:`localmed.serve.audit`). Where it listens is
:mod:`localmed.serve.binding`'s.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TextIO

from aiohttp import web

from localmed.errors import EngineDiedError, LocalmedError, ServeError, TemplateError
from localmed.images import Image, prompt_parts
from localmed.runtimes.messages import Event
from localmed.serve.audit import AuditError, AuditLog, request_record
from localmed.serve.documents import ServedDocs
from localmed.serve.jobs import Job, Jobs, ServedModel, ServerBusyError
from localmed.serve.keys import KeyRing, RateLimit
from localmed.serve.openai_fields import (
    APIError,
    cache_prompt,
    chat_messages,
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
from localmed.serve.wire import (
    MAX_CONNECTIONS,
    Refuse,
    complete,
    json_response,
    read_body,
    read_images,
    refusal,
    stream,
)
from localmed.templates import Message

MAX_BODY = 8 * 1024 * 1024
MAX_IMAGE_BODY = 48 * 1024 * 1024
"""The body bound of a server whose model takes images: one image of the largest size taken,
base64-encoded (a 16-bit chest radiograph as PNG can be 10-30 MB)."""
MAX_IMAGES = 16
"""Images one request may carry (each is decoded before the request waits)."""
KEEPALIVE_SECONDS = 75.0
"""An idle kept-alive connection is closed after this (aiohttp's default)."""
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
                return Refuse()
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
        return json_response(200, model_list(served, self.started))

    async def _embeddings(self, request: web.Request) -> web.Response:
        """OpenAI's ``/v1/embeddings`` on the embedding model, texts as they are."""
        assert self.docs is not None
        body = await read_body(request)
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
        return json_response(200, embeddings_response(self.docs.embedding_id, result.vectors,
                                              result.tokens, as_base64))

    async def _health(self, request: web.Request) -> web.Response:
        return json_response(200, {"status": "ok", "model": self.model.id,
                           "localmed": self.model.notice()})

    async def _completion(self, request: web.Request) -> web.StreamResponse:
        """Everything that can refuse a request is decided here, before it waits: the body,
        its fields, the template, the schema's grammar, the prompt's length (tokenized beside
        any running decode), then room in the queue."""
        route = request.path.rstrip("/")
        body = await read_body(request)
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
                return await stream(request, job, kind, self.model)
            return await complete(request, job, kind, self.model)
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
            response = json_response(failed.status, failed.body(), headers)
        except web.HTTPException as http:  # no such route or method
            if http.status in (404, 405):
                failed = APIError(404, f"no such endpoint: {request.method} {request.path}",
                                  code="not_found")
            else:
                failed = APIError(http.status, http.reason)
            response = json_response(failed.status, failed.body())
        except ServerBusyError as busy:  # decided at once: nobody waits to hear it
            response = json_response(503, APIError(503, str(busy), kind="server_error",
                                           code="server_busy").body(), {"Retry-After": "1"})
        except EngineDiedError as died:  # down: reloaded in the background, answered at once
            response = json_response(503, APIError(503, f"{died}; retry the request",
                                           kind="server_error", code="engine_died").body(),
                             {"Retry-After": "5"})
            self.jobs.revive()
        except LocalmedError as refused:  # the request's fault, in localmed's own sentence
            request["refusal"] = str(refused)
            response = json_response(400, refusal(refused).body())
        except (asyncio.CancelledError, ConnectionError):  # the client left
            self._log_request(request, 499, started)
            if self.audit is not None:
                self._audit(request, 499)
            raise
        except Exception as exc:  # never a traceback to the client; the server keeps serving
            print(f"localmed serve: internal error: {type(exc).__name__}: {exc}",
                  file=self.log, flush=True)
            response = json_response(500, APIError(500, f"internal error: {type(exc).__name__}",
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
        accepted, drafted = request.get("drafts", (0, 0))
        drafts = f" (drafts {accepted}/{drafted} taken)" if drafted else ""
        print(f"{when} {request.remote}{key} {request.method} {request.path} {status} "
              f"{prompt}+{generated} tokens{drafts} {time.monotonic() - started:.2f}s",
              file=self.log, flush=True)

    def _audit(self, request: web.Request, status: int) -> None:
        assert self.audit is not None
        try:
            self.audit.append(**request_record(
                request, status, model_sha256=self.model_sha256, content=self.log_content))
        except AuditError as failed:  # the next requests are refused until a write succeeds
            print(f"localmed serve: {failed}", file=self.log, flush=True)


def restore_signals(handlers: dict[int, Any]) -> None:
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


