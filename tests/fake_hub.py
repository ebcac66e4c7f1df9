"""A Hugging Face hub on 127.0.0.1 for the tests: the few routes ``localmed pull`` reaches
through the real huggingface_hub (``HF_ENDPOINT``), with connections that can be cut mid-file.

- ``GET /api/models/{repo}[/revision/{rev}]``: the repo's info, with each file's LFS sha256;
- ``HEAD|GET /{repo}/resolve/{rev}/{file}``: the file, with the headers huggingface_hub reads
  (``X-Repo-Commit``, ``X-Linked-Etag`` = sha256, ``X-Linked-Size``) and ``Range`` support.

``token``: when set, the repo is gated: a request without ``Authorization: Bearer <token>`` gets
the hub's 401 ``GatedRepo``. ``cut_after[file] = (n_bytes, times)``: the next ``times`` GETs of ``file`` send its headers,
``n_bytes`` of it, and then close the connection, as a dropped Wi-Fi link does.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "b" * 40


class FakeHub:
    def __init__(self, repo: str, files: dict[str, Path]) -> None:
        self.repo = repo
        self.files = files
        self.sha256 = {name: hashlib.sha256(path.read_bytes()).hexdigest()
                       for name, path in files.items()}
        self.cut_after: dict[str, tuple[int, int]] = {}
        self.token: str | None = None
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                hub._serve(self, body=False)

            def do_GET(self) -> None:
                hub._serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _serve(self, handler: BaseHTTPRequestHandler, *, body: bool) -> None:
        path = handler.path.split("?", 1)[0]
        self.requests.append((handler.command, path, handler.headers.get("Range")))
        if self.token and handler.headers.get("Authorization") != f"Bearer {self.token}":
            return self._send(handler, 401, {"X-Error-Code": "GatedRepo", "X-Error-Message":
                                             "Access to this model is restricted."}, b"", body)
        if path in (f"/api/models/{self.repo}", f"/api/models/{self.repo}/revision/main"):
            siblings = [{"rfilename": name, "size": p.stat().st_size,
                         "lfs": {"sha256": self.sha256[name], "size": p.stat().st_size,
                                 "pointerSize": 134}} for name, p in self.files.items()]
            data = json.dumps({"id": self.repo, "sha": COMMIT, "siblings": siblings}).encode()
            return self._send(handler, 200, {"Content-Type": "application/json"}, data, body)
        match = re.fullmatch(rf"/{re.escape(self.repo)}/resolve/[^/]+/(.+)", path)
        if not match or match.group(1) not in self.files:
            return self._send(handler, 404, {"X-Error-Code": "EntryNotFound"}, b"", body)
        name = match.group(1)
        data = self.files[name].read_bytes()
        headers = {"X-Repo-Commit": COMMIT, "X-Linked-Etag": f'"{self.sha256[name]}"',
                   "ETag": f'"{self.sha256[name]}"', "X-Linked-Size": str(len(data)),
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        status, start = 200, 0
        if body and (wanted := handler.headers.get("Range")):
            start = int(re.fullmatch(r"bytes=(\d+)-", wanted).group(1))
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        payload = data[start:]
        cut = self.cut_after.get(name) if body else None
        if cut and cut[1] > 0:
            self.cut_after[name] = (cut[0], cut[1] - 1)
            handler.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(payload))}.items():
                handler.send_header(key, value)
            handler.end_headers()
            handler.wfile.write(payload[:cut[0]])
            handler.wfile.flush()
            handler.close_connection = True
            handler.connection.shutdown(2)
            return None
        return self._send(handler, status, headers, payload, body)

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, headers: dict[str, str],
              payload: bytes, body: bool) -> None:
        handler.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(payload))}.items():
            handler.send_header(key, value)
        handler.end_headers()
        if body:
            handler.wfile.write(payload)
