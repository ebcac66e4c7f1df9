"""``localmed serve``: an OpenAI-compatible API on the laptop, over one engine process.

Built on the standard library's ``ThreadingHTTPServer`` rather than llama-cpp-python's bundled
server (whose running request is interrupted by the next one) or FastAPI (three more packages to
install and audit on a clinic laptop): the decoding happens in the engine
(:mod:`localmed.serve.jobs`), so each request thread only checks the request, is admitted or
refused at once, and relays what the engine streams. A client that hangs up stops only its own
reply.

Every reply carries the disclaimer: the ``X-Localmed-Disclaimer`` header, and a ``localmed``
object in the JSON (in the first chunk of a stream) with the disclaimer, the model's advisory
and what was served. Requests are logged without their content unless ``--log-content``.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import queue
import select
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TextIO

from localmed.conversation import DISCLAIMER
from localmed.errors import (
    ContextFullError,
    EngineDiedError,
    LocalmedError,
    ServeError,
    TemplateError,
)
from localmed.runtimes.base import GenerationStats
from localmed.runtimes.batch import GrammarError
from localmed.serve.jobs import Job, Jobs, ServedModel, ServerBusyError, UnsupportedError
from localmed.serve.openai_fields import (
    APIError,
    cache_prompt,
    chat_messages,
    finish_reason,
    logprobs,
    merge_runs,
    response_format,
    sampling,
    seed,
    stop_strings,
    usage,
)
from localmed.templates import Message

DISCLAIMER_HEADER = "X-Localmed-Disclaimer"
MAX_BODY = 8 * 1024 * 1024
HANGUP_POLL = 0.25
"""Seconds between looks at whether a waiting client has hung up (its reply is then stopped
and its slot freed)."""


# --- the HTTP side ------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    """Routes the OpenAI endpoints; answers every failure as an OpenAI-style error."""

    server: LocalServer
    protocol_version = "HTTP/1.1"
    server_version = "localmed"

    def do_GET(self) -> None:
        self._guarded(self._get)

    def do_POST(self) -> None:
        self._guarded(self._post)

    def _get(self) -> None:
        self._authorize()
        if self.path.rstrip("/") == "/v1/models":
            served = self.server.model
            self._json(200, {"object": "list", "data": [{
                "id": served.id, "object": "model", "created": self.server.started,
                "owned_by": "localmed", "localmed": served.notice()}]})
        elif self.path.rstrip("/") in ("", "/health"):
            self._json(200, {"status": "ok", "model": self.server.model.id,
                             "localmed": self.server.model.notice()})
        else:
            raise APIError(404, f"no such endpoint: GET {self.path}", code="not_found")

    def _post(self) -> None:
        """Everything that can refuse a request is decided here, before it waits: the body,
        its fields, the template, the schema's grammar, the prompt's length (tokenized beside
        any running decode), then room in the queue."""
        self._authorize()
        route = self.path.rstrip("/")
        if route not in ("/v1/chat/completions", "/v1/completions"):
            raise APIError(404, f"no such endpoint: POST {self.path}", code="not_found")
        body = self._body()
        served, jobs = self.server.model, self.server.jobs
        model = body.get("model", served.id)
        if model != served.id:
            raise APIError(400, f"the model '{model}' is not served here; this server has "
                           f"'{served.id}'", param="model", code="model_not_found")
        params = sampling(body, served.defaults)
        top_logprobs = logprobs(body, chat=route == "/v1/chat/completions")
        wants_json, schema = response_format(body)
        if route == "/v1/chat/completions":
            prompt = self._render(chat_messages(body))
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
        grammar = jobs.json_grammar(schema) if wants_json else None
        tokens = jobs.tokenize(prompt)
        if len(tokens) >= jobs.n_ctx:
            raise APIError(400, f"this server gives each reply {jobs.n_ctx} tokens of context "
                           f"({jobs.parallel} at once); the prompt has {len(tokens)}",
                           param=where, code="context_length_exceeded")
        job = Job(prompt, params, stops, tokens, seed(body), grammar, top_logprobs,
                  cache_prompt(body, served.cache_prompt))
        jobs.admit(job)
        self._log_content(route, body)
        if body.get("stream"):
            self._stream(job, kind)
        else:
            self._complete(job, kind)

    def _render(self, messages: list[Message]) -> str:
        """The template's prompt; consecutive messages of one role merged where the template
        wants turns to alternate."""
        template = self.server.model.template
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

    def _events(self, job: Job) -> Iterator[tuple[str, Any]]:
        """The job's events; OSError when the client hangs up before its reply is done (even
        while nothing is written: during a long prefill, or a reply that is not streamed)."""
        while True:
            try:
                event = job.events.get(timeout=HANGUP_POLL)
            except queue.Empty:
                if self._client_left():
                    raise ConnectionAbortedError("the client hung up") from None
                continue
            if event[0] == "error":
                error = event[1]
                if isinstance(error, EngineDiedError):
                    raise APIError(503, f"{error}; it is being reloaded, retry the request",
                                   kind="server_error", code="engine_died")
                if isinstance(error, LocalmedError):
                    raise refusal(error)
                raise APIError(500, "the model engine failed on this request",
                               kind="server_error")
            yield event
            if event[0] == "done":
                return

    def _complete(self, job: Job, kind: str) -> None:
        try:
            parts: list[str] = []
            entries: list[dict[str, Any]] = []
            stats = GenerationStats()
            for name, value in self._events(job):
                if name == "piece":
                    parts.append(value)
                elif name == "logprobs":
                    entries += value
                else:
                    stats = value
        except BaseException:
            self.server.jobs.cancel(job)
            raise
        text = "".join(parts)
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason(stats)}
        if kind == "chat.completion":
            choice["message"] = {"role": "assistant", "content": text}
            choice["logprobs"] = {"content": entries} if job.logprobs is not None else None
        else:
            choice |= {"text": text, "logprobs": None}
        self.tokens = (stats.prompt_tokens, stats.generated_tokens)
        self._json(200, {**self._head(kind), "choices": [choice], "usage": usage(stats),
                         "localmed": self.server.model.notice()})

    def _stream(self, job: Job, kind: str) -> None:
        chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else kind
        head = self._head(chunk_kind)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.send_header(DISCLAIMER_HEADER, DISCLAIMER)
        self.end_headers()
        self.close_connection = True
        self.status = 200

        entries: list[dict[str, Any]] = []

        def choice(text: str | None, reason: str | None, first: bool = False) -> dict[str, Any]:
            if kind != "chat.completion":
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text:
                delta["content"] = text
            out = {"index": 0, "delta": delta, "finish_reason": reason}
            if entries:  # the log probabilities of the tokens this chunk's text came from
                out["logprobs"] = {"content": entries.copy()}
                entries.clear()
            return out

        try:
            self._event({**head, "choices": [choice("", None, True)],
                         "localmed": self.server.model.notice()})
            for name, value in self._events(job):
                if name == "logprobs":
                    entries += value
                elif name == "piece":
                    self._event({**head, "choices": [choice(value, None)]})
                else:
                    self.tokens = (value.prompt_tokens, value.generated_tokens)
                    self._event({**head, "choices": [choice(None, finish_reason(value))],
                                 "usage": usage(value)})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except APIError as failed:
            self._event(failed.body())
        except OSError:  # the client hung up: stop its reply, let the next one run
            self.server.jobs.cancel(job)

    def _client_left(self) -> bool:
        """Whether the client closed its end: readable with nothing to read (a client that
        sends more, such as a pipelined request, has not left)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _event(self, data: dict[str, Any]) -> None:
        self.wfile.write(b"data: " + json.dumps(data).encode() + b"\n\n")
        self.wfile.flush()

    def _head(self, kind: str) -> dict[str, Any]:
        prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
        return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": kind,
                "created": int(time.time()), "model": self.server.model.id}

    # --- plumbing -------------------------------------------------------------------------------

    def _guarded(self, route: Any) -> None:
        self.started = time.monotonic()
        self.status = 0
        self.tokens = (0, 0)
        try:
            route()
        except APIError as failed:
            headers = {"WWW-Authenticate": "Bearer"} if failed.status == 401 else {}
            self._json(failed.status, failed.body(), headers)
        except ServerBusyError as busy:  # decided at once: nobody waits to hear it
            self._json(503, APIError(503, str(busy), kind="server_error",
                                     code="server_busy").body(), {"Retry-After": "1"})
        except EngineDiedError as died:  # between requests: the next one reloads it
            self._json(503, APIError(503, f"{died}; retry the request", kind="server_error",
                                     code="engine_died").body(), {"Retry-After": "5"})
            self.server.jobs.reload(died)
        except LocalmedError as refused:  # the request's fault, in localmed's own sentence
            self._json(400, refusal(refused).body())
        except OSError:
            self.close_connection = True
        except Exception as exc:  # never a traceback to the client; the server keeps serving
            print(f"localmed serve: internal error: {type(exc).__name__}: {exc}",
                  file=self.server.log, flush=True)
            self._json(500, APIError(500, f"internal error: {type(exc).__name__}",
                                     kind="server_error").body())
        self._log_request()

    def _authorize(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise APIError(401, "missing or wrong API key (Authorization: Bearer …)",
                           code="invalid_api_key")

    def _body(self) -> dict[str, Any]:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise APIError(411, "a Content-Length header is required") from None
        if length < 0 or length > MAX_BODY:
            raise APIError(413, f"the request body is over {MAX_BODY // (1024 * 1024)} MiB")
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise APIError(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        return body

    def _json(self, status: int, data: dict[str, Any], headers: dict[str, str] | None = None
              ) -> None:
        payload = json.dumps(data).encode()
        self.status = status
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.send_header(DISCLAIMER_HEADER, DISCLAIMER)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)
        except OSError:
            self.close_connection = True

    def _log_content(self, route: str, body: dict[str, Any]) -> None:
        if self.server.log_content:
            print(f"localmed serve: {route} content: {json.dumps(body)[:4000]}",
                  file=self.server.log, flush=True)

    def _log_request(self) -> None:
        seconds = time.monotonic() - self.started
        prompt, completion = self.tokens
        print(f"{self.log_date_time_string()} {self.client_address[0]} {self.command} "
              f"{self.path} {self.status} {prompt}+{completion} tokens {seconds:.2f}s",
              file=self.server.log, flush=True)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request, written by _log_request, without content


class LocalServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], *, api_key: str | None,
                 log_content: bool = False, log: TextIO = sys.stderr) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, Handler)
        self.api_key = api_key
        self.log_content = log_content
        self.log = log
        self.started = int(time.time())
        self.model: ServedModel
        self.jobs: Jobs

    def attach(self, model: ServedModel, jobs: Jobs) -> None:
        self.model = model
        self.jobs = jobs

    def server_close(self) -> None:
        """Close the socket, and the queue's worker if a model was attached."""
        if hasattr(self, "jobs"):
            self.jobs.close()
        super().server_close()


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


def check_host(host: str, api_key: str | None) -> None:
    """A host that resolves; beyond loopback only with an API key."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (socket.gaierror, UnicodeError):
        raise ServeError(f"--host {host}: not an address or a name this machine can resolve") \
            from None
    loopback = all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)
    if not loopback and not api_key:
        raise ServeError(f"--host {host} is reachable from other machines: set an API key "
                         "(--api-key or LOCALMED_API_KEY) to serve beyond this laptop")


def bind(host: str, port: int, *, api_key: str | None, log_content: bool = False,
         log: TextIO = sys.stderr) -> LocalServer:
    """Bind before the model loads: a port in use is said in a second, not after a minute."""
    check_host(host, api_key)
    if not 0 < port < 65536:
        raise ServeError(f"--port {port}: not a TCP port (1-65535)")
    try:
        return LocalServer((host, port), api_key=api_key, log_content=log_content, log=log)
    except PermissionError:
        raise ServeError(f"port {port}: not allowed for this user (ports below 1024 need "
                         "root); choose --port 8080 or above") from None
    except OSError as exc:
        if exc.errno in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
            raise ServeError(f"port {port} on {host} is in use (another localmed serve, "
                             "Ollama or LM Studio?); choose another with --port") from None
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
