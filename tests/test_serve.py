"""`localmed serve` as a client sees it: a real server process on loopback, a real HTTP client
(httpx), a real tiny GGUF in a real engine process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from localmed.conversation import DISCLAIMER
from localmed.serve.wire import DISCLAIMER_HEADER

GREEDY = {"temperature": 0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "localmed", "serve", str(model), "--port", str(self.port),
             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **(env or {})})
        self.client = httpx.Client(base_url=self.url, timeout=120)
        # The port is bound before the model loads; the banner on stdout says it is ready.
        banner = self.proc.stdout.readline()
        assert "localmed serve" in banner, (banner, self.proc.stderr.read())

    def banner(self) -> str:
        """The rest of the start-up banner (to its "Ctrl-C" line), or what came before the
        server ended: never a wait on a pipe that has closed."""
        lines: list[str] = []
        while not lines or "Ctrl-C" not in lines[-1]:
            line = self.proc.stdout.readline()
            assert line, ("the server ended before its banner", "".join(lines),
                          self.proc.stderr.read())
            lines.append(line)
        return " ".join(" ".join(lines).split())

    def stop(self) -> int:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:  # say where it is stuck: every thread's stack
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(2)
            self.proc.kill()
            raise AssertionError("the server did not stop within 60 s of SIGTERM:\n"
                                 + self.proc.stderr.read()[-12000:]) from None


@pytest.fixture(scope="module")
def tiny(converted) -> Path:
    return converted["llama"]["Q8_0"]


@pytest.fixture(scope="module")
def server(tiny) -> Iterator[Server]:
    running = Server(tiny, "--ctx", "256")
    yield running
    running.stop()


def chat(text: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 12, **GREEDY,
            **extra}


def sse(response: httpx.Response) -> list[dict]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append({"done": True} if data == "[DONE]" else json.loads(data))
    return events


class TestEndpoints:
    def test_models_lists_the_one_model_with_the_disclaimer(self, server, tiny):
        r = server.client.get("/v1/models")
        assert r.status_code == 200 and r.headers[DISCLAIMER_HEADER] == DISCLAIMER
        (model,) = r.json()["data"]
        assert model["id"] == tiny.stem and model["localmed"]["disclaimer"] == DISCLAIMER

    def test_chat_completion(self, server):
        r = server.client.post("/v1/chat/completions", json=chat("Fever and cough?"))
        assert r.status_code == 200, r.text
        body = r.json()
        assert r.headers[DISCLAIMER_HEADER] == DISCLAIMER
        assert body["object"] == "chat.completion" and body["localmed"]["disclaimer"] == DISCLAIMER
        choice = body["choices"][0]
        assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
        assert body["usage"]["completion_tokens"] <= 12
        assert choice["finish_reason"] in ("stop", "length")

    def test_completion(self, server):
        r = server.client.post("/v1/completions", json={"prompt": "The patient", "max_tokens": 8,
                                                        **GREEDY})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion" and body["choices"][0]["text"]
        assert body["localmed"]["disclaimer"] == DISCLAIMER

    def test_streaming_gives_the_same_text_as_not(self, server):
        whole = server.client.post("/v1/chat/completions", json=chat("Chest pain")).json()
        with server.client.stream("POST", "/v1/chat/completions",
                                  json=chat("Chest pain", stream=True)) as r:
            assert r.status_code == 200 and r.headers[DISCLAIMER_HEADER] == DISCLAIMER
            events = sse(r)
        assert events[0]["localmed"]["disclaimer"] == DISCLAIMER
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert events[-1] == {"done": True}
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:-1])
        assert text == whole["choices"][0]["message"]["content"]
        assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")

    def test_two_concurrent_requests_both_complete_unmixed(self, server):
        """Each as it would be alone: the second waits its turn, never interrupts the first."""
        alone = [server.client.post("/v1/completions", json={
            "prompt": p, "max_tokens": 24, **GREEDY}).json()["choices"][0]["text"]
            for p in ("Diagnosis:", "Treatment:")]
        results: dict[str, str] = {}

        def ask(prompt: str) -> None:
            with httpx.Client(base_url=server.url, timeout=120) as client:
                with client.stream("POST", "/v1/completions", json={
                        "prompt": prompt, "max_tokens": 24, "stream": True, **GREEDY}) as r:
                    events = sse(r)
            results[prompt] = "".join(e["choices"][0]["text"] for e in events[1:-1])

        threads = [threading.Thread(target=ask, args=(p,)) for p in ("Diagnosis:", "Treatment:")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [results["Diagnosis:"], results["Treatment:"]] == alone


class TestBadRequests:
    """Each an HTTP 400 with an OpenAI-style body; the server keeps serving."""

    def assert_400(self, r: httpx.Response, *fragments: str, code: str | None = None) -> None:
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"]
        assert r.headers[DISCLAIMER_HEADER] == DISCLAIMER
        if code:
            assert error["code"] == code
        for fragment in fragments:
            assert fragment in error["message"], error

    def test_malformed_json(self, server):
        r = server.client.post("/v1/chat/completions", content=b'{"messages": [',
                               headers={"Content-Type": "application/json"})
        self.assert_400(r, "not valid JSON")

    def test_unknown_model(self, server, tiny):
        r = server.client.post("/v1/chat/completions", json=chat("x", model="gpt-4"))
        self.assert_400(r, "gpt-4", tiny.stem, code="model_not_found")

    def test_prompt_longer_than_the_context(self, server):
        r = server.client.post("/v1/chat/completions", json=chat("fever " * 600))
        self.assert_400(r, "256 tokens", code="context_length_exceeded")

    @pytest.mark.parametrize("value", [0, -5, "ten", 2.5])
    def test_max_tokens_not_positive(self, server, value):
        r = server.client.post("/v1/completions", json={"prompt": "x", "max_tokens": value})
        self.assert_400(r, "max_tokens")

    def test_messages_missing_or_wrong(self, server):
        self.assert_400(server.client.post("/v1/chat/completions", json={"max_tokens": 3}),
                        "messages")
        self.assert_400(server.client.post("/v1/chat/completions", json={
            "messages": [{"role": "doctor", "content": "x"}]}), "role")

    def test_still_serving_afterwards(self, server):
        r = server.client.post("/v1/chat/completions", json=chat("Headache"))
        assert r.status_code == 200

    def test_unknown_endpoint_is_404(self, server):
        r = server.client.get("/v1/embeddings")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


class TestStartAndStop:
    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "localmed", "serve", *args],
                              capture_output=True, text=True, timeout=120)

    def assert_refused(self, result: subprocess.CompletedProcess, *fragments: str) -> None:
        assert result.returncode == 2, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
        for fragment in fragments:
            assert fragment in lines[0], lines[0]

    def test_port_in_use(self, tiny):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            self.assert_refused(self.run(str(tiny), "--port", str(port)), "in use", str(port))

    def test_bad_host(self, tiny):
        self.assert_refused(self.run(str(tiny), "--host", "no-such-host.invalid"), "--host")

    def test_beyond_loopback_needs_a_key(self, tiny):
        self.assert_refused(self.run(str(tiny), "--host", "0.0.0.0", "--port",
                                     str(free_port())), "API key")

    def test_with_a_key_requests_need_it(self, tiny):
        running = Server(tiny, "--host", "0.0.0.0", "--insecure-http",
                         env={"LOCALMED_API_KEY": "s3cret"})
        try:
            assert running.client.get("/v1/models").status_code == 401
            assert running.client.get("/v1/models", headers={
                "Authorization": "Bearer wrong"}).status_code == 401
            r = running.client.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
            assert r.status_code == 200
        finally:
            running.stop()

    def test_sigterm_shuts_down_cleanly_and_logs_no_content(self, tiny):
        running = Server(tiny)
        secret = "patient Jane Roe 1961"
        assert running.client.post("/v1/chat/completions",
                                   json=chat(secret)).status_code == 200
        assert running.stop() == 0
        log = running.proc.stderr.read()
        assert "POST /v1/chat/completions 200" in log and secret not in log
        assert "Traceback" not in log


def engine_pids(parent: int) -> list[int]:
    """The engine processes (multiprocessing's spawned children) of ``parent``."""
    children = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True,
                              text=True).stdout.split()
    return [int(pid) for pid in children
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def test_an_engine_killed_mid_reply_is_answered_and_reloaded(tiny):
    """SIGKILL to the engine process (as the OOM killer does) while a reply streams: that
    request gets an error event, the server reloads the model, the next request works."""
    running = Server(tiny)
    try:
        engines = engine_pids(running.proc.pid)
        assert len(engines) == 1
        with running.client.stream("POST", "/v1/completions", json={
                "prompt": "A", "max_tokens": 200, "stream": True, **GREEDY}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # the reply has begun
            os.kill(engines[0], signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data: ")]
        assert any("engine_died" in line for line in rest), rest
        r = running.client.post("/v1/chat/completions", json=chat("again"))
        assert r.status_code == 200, r.text
    finally:
        running.stop()
