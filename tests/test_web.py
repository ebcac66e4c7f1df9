"""``localmed chat --web``: the Textual app served by textual-serve, in a real headless Chromium.

The page must load with no request leaving 127.0.0.1, show the disclaimer banner, and answer a
message with the real SmolLM2; a page of another origin must not be able to drive the chat; a
port in use is one line. What the browser receives over the WebSocket is the app's terminal
output (xterm.js draws it on a canvas), so the text checks read those frames, and a screenshot
is taken of what is drawn.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from localmed.conversation import DISCLAIMER
from tests.test_serve import free_port

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\x1b[=>]")
# Chromium as root in a container, with nothing of its own reaching out (updates, sync, ...)
UPGRADE = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


class WebChat:
    def __init__(self, model: Path, *options: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "localmed", "chat", str(model), "--web", "--port",
             str(self.port), *options], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env={**os.environ, "COLUMNS": "200"})
        banner = self.proc.stdout.readline()
        assert self.url in banner, (banner, self.proc.stderr.read())

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(60)


@pytest.fixture(scope="module")
def web_chat(smollm2) -> Iterator[WebChat]:
    running = WebChat(smollm2["gguf"])
    yield running
    running.stop()


def test_the_chat_in_a_browser_loads_nothing_from_outside_and_answers(smollm2, chromium,
                                                                      tmp_path):
    import psutil
    from playwright.sync_api import sync_playwright

    web_chat = WebChat(smollm2["gguf"])

    requests: list[str] = []
    frames: list[str] = []

    def on_websocket(ws) -> None:
        requests.append(ws.url)
        ws.on("framereceived", lambda f: frames.append(
            f if isinstance(f, str) else f.decode("utf-8", "replace")))

    def screen_text() -> str:
        return ANSI.sub("", "".join(frames))

    def wait_for(pattern: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, screen_text()):
                return True
            page.wait_for_timeout(200)
        return False

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.on("request", lambda r: requests.append(r.url))
            page.on("websocket", on_websocket)
            page.goto(web_chat.url)
            assert wait_for(re.escape(DISCLAIMER[:40]), 90), screen_text()[-2000:]
            assert wait_for(r"Ask the model", 30), screen_text()[-2000:]
            page.focus(".xterm-helper-textarea")  # where xterm.js takes the keyboard
            page.keyboard.type("What is the normal adult resting heart rate?")
            page.keyboard.press("Enter")
            # the question echoed in the conversation, then a reply measured in the status line
            assert wait_for(r"(?s)Clinician.*normal adult resting heart rate", 30), \
                screen_text()[-2000:]
            assert wait_for(r"\d+\.\d tok/s", 120), screen_text()[-2000:]
            page.screenshot(path=tmp_path / "chat-web.png")
            # one chat (one model in memory) at a time by default: a second tab is told why,
            # and its WebSocket is refused before any model loads
            second = httpx.get(web_chat.url)
            assert second.status_code == 503 and "already open in 1 other tab" in second.text
            assert "--sessions 2" in second.text
            upgrade = httpx.get(f"{web_chat.url}/ws", headers={**UPGRADE,
                                                               "Origin": web_chat.url})
            assert upgrade.status_code == 503
            # Ctrl+C with the page still open ends the server and the chat it started, at once
            chats = [c for c in psutil.Process(web_chat.proc.pid).children(recursive=True)
                     if "chat" in c.cmdline()]
            assert chats
            started = time.monotonic()
            assert web_chat.stop() == 0
            assert time.monotonic() - started < 15
            assert not [c for c in chats if c.is_running() and c.status() != "zombie"]
        finally:
            browser.close()
            web_chat.stop()
    assert (tmp_path / "chat-web.png").stat().st_size > 10_000
    assert requests and {urlsplit(u).hostname for u in requests} == {"127.0.0.1"}, requests
    # the packaged font is what the page uses, not a font CDN's
    assert any(u.endswith(".ttf") for u in requests), requests


class Tab:
    """A browser page on the chat, read through the terminal frames its WebSocket receives."""

    def __init__(self, browser, url: str) -> None:
        self.frames: list[str] = []
        self.page = browser.new_page(viewport={"width": 1200, "height": 800})
        self.page.on("websocket", lambda ws: ws.on("framereceived", lambda f: self.frames.append(
            f if isinstance(f, str) else f.decode("utf-8", "replace"))))
        self.page.goto(url)

    def text(self) -> str:
        return ANSI.sub("", "".join(self.frames))

    def wait_for(self, pattern: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.text()):
                return
            self.page.wait_for_timeout(200)
        raise AssertionError(f"{pattern!r} not on the page: {self.text()[-1500:]}")

    def ask(self, question: str) -> None:
        self.page.focus(".xterm-helper-textarea")
        self.page.keyboard.type(question)
        self.page.keyboard.press("Enter")


def test_two_tabs_share_one_loaded_model(smollm2, chromium, tmp_path):
    """`--sessions 2`: the GGUF is mapped by one process (the engine, one context for each
    conversation), not by each tab's; both tabs are answered, at once, and a third is refused
    before anything loads; a closed tab's conversation ends with it."""
    import psutil
    from playwright.sync_api import sync_playwright

    web_chat = WebChat(smollm2["gguf"], "--sessions", "2")
    gguf = str(Path(smollm2["gguf"]).resolve())

    def mapping_the_model() -> list[psutil.Process]:
        tree = psutil.Process(web_chat.proc.pid).children(recursive=True)
        return [p for p in tree if any(m.path == gguf for m in p.memory_maps())]

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            tabs = [Tab(browser, web_chat.url) for _ in range(2)]
            for tab in tabs:
                tab.wait_for(r"Ask the model", 90)
            tabs[0].ask("What is the normal adult resting heart rate?")
            tabs[1].ask("Name one symptom of anaemia.")
            for tab in tabs:
                tab.wait_for(r"\d+\.\d tok/s", 180)
            engines = mapping_the_model()
            assert len(engines) == 1 and "chat" not in engines[0].cmdline(), engines
            chats = [p for p in psutil.Process(web_chat.proc.pid).children(recursive=True)
                     if "chat" in p.cmdline()]
            assert len(chats) == 2
            third = httpx.get(web_chat.url)
            assert third.status_code == 503 and "loaded for that many conversations" in \
                third.text
            tabs[1].page.close()  # its chat process ends; its place is free again
            deadline = time.monotonic() + 30
            while httpx.get(web_chat.url).status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert httpx.get(web_chat.url).status_code == 200
            tabs[0].ask("And in a newborn?")  # the remaining tab goes on
            tabs[0].wait_for(r"(?s)newborn.*\d+\.\d tok/s", 180)
            tabs[0].page.screenshot(path=tmp_path / "two-tabs.png")
        finally:
            browser.close()
            assert web_chat.stop() == 0


def test_a_page_of_another_origin_cannot_drive_the_chat(web_chat):
    r = httpx.get(f"{web_chat.url}/ws", headers={**UPGRADE, "Origin": "http://example.org"})
    assert r.status_code == 403
    r = httpx.get(f"{web_chat.url}/ws", headers=UPGRADE)  # no Origin: not a browser page
    assert r.status_code == 403


def test_a_port_in_use_is_one_line(smollm2):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "localmed", "chat", str(smollm2["gguf"]),
                              "--web", "--port", str(port)], capture_output=True, text=True,
                             timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: port {port} on 127.0.0.1 is in use; choose another " \
                                 "with --port", out.stderr
    assert out.stdout == ""


def test_web_options_without_web_are_one_line(smollm2):
    out = subprocess.run([sys.executable, "-m", "localmed", "chat", str(smollm2["gguf"]),
                          "--sessions", "2"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == "error: --port and --sessions are for --web (the chat in a " \
                                 "browser)"


def test_a_malformed_message_ends_that_session_in_one_line_and_the_server_goes_on(smollm2):
    import asyncio

    import aiohttp

    web_chat = WebChat(smollm2["gguf"])

    async def session(message: str) -> None:
        async with aiohttp.ClientSession() as client, client.ws_connect(
                f"{web_chat.url}/ws?width=80&height=24", origin=web_chat.url) as ws:
            await ws.send_str(message)
            await ws.receive(timeout=60)  # the app's first bytes, or the close

    try:
        asyncio.run(session("not json{"))
        deadline = time.monotonic() + 30  # the session's slot is freed once its app has ended
        while httpx.get(web_chat.url).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert httpx.get(web_chat.url).status_code == 200
        asyncio.run(session('["ping", "x"]'))  # a good session after it
    finally:
        assert web_chat.stop() == 0
    errors = [line for line in web_chat.proc.stderr.read().splitlines() if line.strip()]
    assert errors == ["localmed chat --web: a browser session ended: JSONDecodeError: Expecting "
                      "value: line 1 column 1 (char 0)"], errors
