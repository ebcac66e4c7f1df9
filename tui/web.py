"""``localmed chat --web``: the same Textual app in a browser, through Textual's textual-serve.

Each browser tab that connects starts ``localmed chat`` with the same arguments in a process of
its own, driven by Textual's web driver: the same screens, the same disclaimer banner, the same
engine (for a GGUF, one engine in this process's child, shared by the tabs over a private
Unix socket: :class:`localmed.runtimes.hub.EngineHub`). Three things differ from
textual-serve's defaults, all for an offline clinician:

- it listens on 127.0.0.1 only;
- its page (``web/app_index.html``) loads nothing from outside this server: the package's page
  links a web font from a font CDN, this one declares the Roboto Mono that textual-serve ships;
- the WebSocket that drives the app is refused to any page of another origin. A browser lets
  any site open ``ws://127.0.0.1:PORT``; without this check, a page the clinician visits could
  drive the chat and read it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shlex
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import aiohttp_jinja2
from aiohttp import web
from rich.markup import escape
from textual_serve.server import Server

from localmed.errors import LocalmedError

HOST = "127.0.0.1"
TEMPLATES = Path(__file__).parent / "web"


class ChatWebServer(Server):
    """textual-serve's server with localmed's page, banner line and origin check."""

    def __init__(self, command: str, *, port: int, title: str, max_sessions: int = 1,
                 shared: bool = False) -> None:
        super().__init__(command, host=HOST, port=port, title=title,
                         templates_path=TEMPLATES)
        self.origin = f"http://{HOST}:{port}"
        self.sessions: set[asyncio.Task] = set()
        self.max_sessions = max_sessions
        """A GGUF's engine holds this many conversations (``shared``); a GPTQ folder's model
        is loaded again by each tab's process, and more tabs than memory allows would push
        the machine into swap. Either way, beyond this a tab is told why instead."""
        self.shared = shared

    def initialize_logging(self) -> None:
        """Warnings and errors only, one line each: textual-serve's access log would fill the
        terminal with a line per request, and a session that ends on a malformed message from
        its page would print a traceback with its locals."""
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("localmed chat --web: %(message)s"))
        handler.addFilter(_one_line)
        logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)

    async def on_startup(self, app: web.Application) -> None:
        """Nothing: textual-serve prints its logo here, before the port is bound."""

    def serve(self, debug: bool = False) -> None:
        """textual-serve's serve(), but the line with the address is printed once the port
        accepts connections (aiohttp's ``print`` hook), so whoever reads it can connect."""
        self.debug = debug
        self.initialize_logging()
        web.run_app(self._make_app(), host=self.host, port=self.port, print=self._announce,
                    handle_signals=True)

    def _announce(self, _aiohttp_line: str) -> None:
        self.console.print(f"[bold]{escape(self.title)}[/] in your browser: [bold]{self.public_url}[/]  "
                           "(this machine only; Ctrl+C stops it)", highlight=False,
                           soft_wrap=True)

    def _full(self) -> str | None:
        if len(self.sessions) < self.max_sessions:
            return None
        held = ("the model was loaded for that many conversations" if self.shared else
                "each with the model loaded")
        return (f"localmed chat is already open in {len(self.sessions)} other tab(s) on this "
                f"machine, {held}; close one and reload this page (or start it with "
                f"--sessions {self.max_sessions + 1} if memory allows)")

    async def handle_index(self, request: web.Request) -> web.StreamResponse:
        if busy := self._full():
            return aiohttp_jinja2.render_template("busy.html", request, {
                "title": self.title, "message": busy}, status=503)
        return await super().handle_index(request)

    async def handle_websocket(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Origin") not in {self.origin, f"http://localhost:{self.port}"}:
            raise web.HTTPForbidden(text="localmed chat: WebSocket from another origin refused")
        if busy := self._full():  # decided before the upgrade, not after a model load
            raise web.HTTPServiceUnavailable(text=busy)
        task = asyncio.current_task()
        self.sessions.add(task)
        try:
            return await super().handle_websocket(request)
        finally:
            self.sessions.discard(task)

    async def on_shutdown(self, app: web.Application) -> None:
        """Ctrl+C ends every open chat at once (textual-serve stops its app process when the
        session is cancelled), rather than after aiohttp's grace period for open sockets."""
        for task in list(self.sessions):
            task.cancel()
        await asyncio.gather(*self.sessions, return_exceptions=True)


def _one_line(record: logging.LogRecord) -> bool:
    if record.exc_info:
        error = record.exc_info[1]
        record.msg, record.args = f"a browser session ended: {type(error).__name__}: %s", (error,)
        record.exc_info = record.exc_text = None
    return True


def check_port_free(port: int) -> None:
    """Refuse a port in use before anything is served or loaded, in one line."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((HOST, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise LocalmedError(f"port {port} on {HOST} is in use; choose another with "
                                    "--port") from None
            if error.errno == errno.EACCES:
                raise LocalmedError(f"port {port} needs privileges to listen on; choose one "
                                    "above 1023 with --port") from None
            raise LocalmedError(f"cannot listen on {HOST}:{port}: {error.strerror}") from None


def serve_chat(chat_args: Sequence[str], *, port: int, title: str, sessions: int = 1,
               environment: dict[str, str] | None = None, shared: bool = False) -> None:
    """Serve ``localmed chat CHAT_ARGS`` to browsers on this machine until Ctrl+C, to at most
    ``sessions`` tabs at a time; ``environment``: set for every tab's process (where the
    shared engine is, for ``shared``)."""
    check_port_free(port)
    os.environ.update(environment or {})  # textual-serve starts each tab with this process's
    command = shlex.join([sys.executable, "-m", "localmed", "chat", *chat_args])
    ChatWebServer(command, port=port, title=title, max_sessions=sessions,
                  shared=shared).serve()
