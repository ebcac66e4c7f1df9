"""The link between an engine's llama.cpp and a worker's, at both ends.

A worker's :class:`WorkerRelay` listens where the clinic reaches it; its llama.cpp RPC server
listens on loopback only. For each connection: TLS 1.3 with the clinic's secret
(:mod:`localmed.rpc.secret`), then one line of JSON that says what the worker is
(:class:`WorkerInfo`), then the client's one-line request: ``link`` (from here on bytes go both
ways between the client and the worker's llama.cpp) or ``bye`` (a probe: ``plan``, or a check
before anything is loaded).

On the engine's side a :class:`ClientRelay` listens on loopback for the engine's llama.cpp (which
knows nothing of TLS) and carries each of its connections to the worker.

Both relays run on an asyncio loop in a thread of their own (one TLS object is never read and
written from two threads at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import struct
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from localmed.errors import WorkerError

PROTOCOL = (7, 0, 0)
"""llama.cpp's RPC protocol in the pinned release (``ggml-rpc.h``); a worker of another major
version, or a newer minor one, is refused as llama.cpp refuses it."""

PROBE_SECONDS = 10.0
CHUNK = 1 << 18

_HELLO, _DEVICE_COUNT, _DEVICE_MEMORY = 14, 15, 11
_CAPS = 24  # RPC_CONN_CAPS_SIZE


@dataclass(frozen=True)
class Device:
    name: str
    description: str
    free: int
    total: int


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker says of itself before anything is sent."""

    rpc: tuple[int, int, int]
    devices: tuple[Device, ...]
    host: str = ""
    localmed: str = ""
    secured: bool = True

    @property
    def free(self) -> int:
        return sum(d.free for d in self.devices)

    def to_line(self) -> bytes:
        return (json.dumps({"localmed_worker": 1, **asdict(self)}) + "\n").encode()

    @classmethod
    def from_line(cls, line: bytes) -> WorkerInfo:
        said = json.loads(line)
        if not isinstance(said, dict) or said.get("localmed_worker") != 1:
            raise ValueError("no worker greeting")
        return cls(rpc=tuple(said["rpc"]), devices=tuple(Device(**d) for d in said["devices"]),
                   host=str(said.get("host", "")), localmed=str(said.get("localmed", "")))


def compatible(version: tuple[int, ...]) -> bool:
    """As llama.cpp's client checks a server: the same major version, a minor one not newer."""
    return len(version) == 3 and version[0] == PROTOCOL[0] and version[1] <= PROTOCOL[1]


def version_text(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


@dataclass(frozen=True)
class Worker:
    """One ``--rpc`` entry."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


# -- speaking llama.cpp's protocol, only as far as a check needs -------------------------------

def _command(sock: Any, cmd: int, payload: bytes, answer: int) -> bytes:
    sock.sendall(struct.pack("<BQ", cmd, len(payload)) + payload)
    size = struct.unpack("<Q", _read(sock, 8))[0]
    if size != answer:
        raise ValueError(f"an answer of {size} bytes where llama.cpp's is {answer}")
    return _read(sock, size)


def _read(sock: Any, n: int) -> bytes:
    data = b""
    while len(data) < n:
        got = sock.recv(n - len(data))
        if not got:
            raise EOFError
        data += got
    return data


def llama_hello(sock: Any) -> tuple[int, int, int]:
    """A llama.cpp RPC server's protocol version (a connection's first command)."""
    answer = _command(sock, _HELLO, bytes(_CAPS), 4 + _CAPS)
    return answer[0], answer[1], answer[2]


def llama_devices(sock: Any) -> tuple[Device, ...]:
    """A llama.cpp RPC server's devices and their memory (after :func:`llama_hello`)."""
    count = struct.unpack("<I", _command(sock, _DEVICE_COUNT, b"", 4))[0]
    devices = []
    for index in range(count):
        free, total = struct.unpack("<QQ", _command(sock, _DEVICE_MEMORY,
                                                    struct.pack("<I", index), 16))
        devices.append(Device(f"RPC{index}", "", free, total))
    return tuple(devices)


# -- a probe: what is at an address, in one line when it is not a worker we can use -------------

def probe(worker: Worker, context: ssl.SSLContext | None, secret: Path | None = None
          ) -> WorkerInfo:
    """What ``worker`` says of itself (``context`` None: llama.cpp's plain protocol,
    ``--insecure-rpc``), or a :class:`WorkerError` naming it."""
    try:
        raw = socket.create_connection((worker.host, worker.port), timeout=PROBE_SECONDS)
    except ConnectionRefusedError:
        raise WorkerError(f"worker {worker}: nothing listens there (connection refused); is "
                          "`localmed worker` running on it, on that port?") from None
    except TimeoutError:
        raise WorkerError(f"worker {worker} did not answer within {PROBE_SECONDS:.0f} s") \
            from None
    except OSError as exc:
        raise WorkerError(f"worker {worker} cannot be reached: {exc.strerror or exc}") from None
    with raw:
        if context is None:
            return _probe_plain(worker, raw)
        return _probe_tls(worker, raw, context, secret)


def _probe_plain(worker: Worker, sock: socket.socket) -> WorkerInfo:
    try:
        version = llama_hello(sock)
        devices = llama_devices(sock) if compatible(version) else ()
    except EOFError:
        raise WorkerError(f"{worker} closed the connection at once: a localmed worker (TLS)? "
                          "then leave out --insecure-rpc") from None
    except (OSError, ValueError, struct.error) as exc:
        raise WorkerError(f"{worker} is not a llama.cpp RPC server ({exc})") from None
    info = WorkerInfo(rpc=version, devices=devices, host=worker.host, secured=False)
    _check_version(worker, info)
    return info


def _probe_tls(worker: Worker, raw: socket.socket, context: ssl.SSLContext,
               secret: Path | None) -> WorkerInfo:
    where = f" ({secret})" if secret else ""
    try:
        with context.wrap_socket(raw) as sock:
            line = _readline(sock)
            sock.sendall(b"bye\n")
    except ssl.SSLCertVerificationError:
        raise WorkerError(f"worker {worker} holds another clinic's RPC secret: its certificate "
                          f"is not this machine's copy{where}") from None
    except ssl.SSLError as exc:
        if "unknown ca" in str(exc).lower() or "certificate" in str(exc).lower():
            raise WorkerError(f"worker {worker} refused this machine: its RPC secret{where} is "
                              "not the worker's") from None
        raise WorkerError(f"{worker} is not a localmed worker (it does not speak TLS 1.3: "
                          f"{exc.reason or exc}); a plain llama.cpp rpc-server takes "
                          "--insecure-rpc") from None
    except (EOFError, ConnectionResetError):
        raise WorkerError(f"{worker} closed the link before saying what it is: not a localmed "
                          "worker, or it refused this machine's RPC secret") from None
    except TimeoutError:
        raise WorkerError(f"{worker} did not say what it is within {PROBE_SECONDS:.0f} s") \
            from None
    except OSError as exc:
        raise WorkerError(f"worker {worker}: {exc.strerror or exc}") from None
    try:
        info = WorkerInfo.from_line(line)
    except (ValueError, KeyError, TypeError):
        raise WorkerError(f"{worker} is not a localmed worker (it answered TLS, then "
                          "something else)") from None
    _check_version(worker, info)
    return info


def _readline(sock: Any, limit: int = 1 << 16) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        got = sock.recv(1)
        if not got:
            raise EOFError
        line += got
        if len(line) > limit:
            raise ValueError("no line")
    return line


def _check_version(worker: Worker, info: WorkerInfo) -> None:
    if not compatible(info.rpc):
        raise WorkerError(f"worker {worker} speaks llama.cpp's RPC protocol "
                          f"{version_text(info.rpc)}, this machine's llama.cpp "
                          f"{version_text(PROTOCOL)}: install the same localmed on both")


# -- the relays -----------------------------------------------------------------------------

class _Loop:
    """An asyncio loop in a daemon thread of its own."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(self._quiet)
        self.said: Callable[[str], None] = lambda line: None
        threading.Thread(target=self.loop.run_forever, name=name, daemon=True).start()

    def run(self, coroutine: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def _quiet(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # A refused TLS handshake reaches here: one line, not asyncio's traceback.
        exc = context.get("exception")
        peer = context.get("transport") and context["transport"].get_extra_info("peername")
        self.said(f"{peer[0] if peer else 'a connection'}: "
                  f"{getattr(exc, 'reason', None) or exc or context.get('message')}")

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One way, to the end of ``reader`` (closing is the caller's)."""
    with contextlib.suppress(OSError, ssl.SSLError, asyncio.IncompleteReadError):
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()


async def _both_ways(a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                     b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                     b_closed: Callable[[], None] = lambda: None) -> None:
    """Bytes both ways until either end closes, which closes the other (llama.cpp then sees
    its link gone); ``b_closed()`` first where ``b`` closed it."""
    from_a = asyncio.ensure_future(_pump(a[0], b[1]))
    from_b = asyncio.ensure_future(_pump(b[0], a[1]))
    done, pending = await asyncio.wait([from_a, from_b], return_when=asyncio.FIRST_COMPLETED)
    if from_b in done and from_a not in done:
        b_closed()
    for writer in (a[1], b[1]):
        with contextlib.suppress(OSError, ssl.SSLError, RuntimeError):
            writer.close()
    for task in pending:
        task.cancel()


@dataclass
class WorkerRelay:
    """A worker's side: TLS from the clinic's machines to its llama.cpp on loopback."""

    host: str
    port: int
    backend: int
    """The loopback port its llama.cpp RPC server listens on."""
    context: ssl.SSLContext
    info: WorkerInfo
    said: Callable[[str], None] = field(default=lambda line: print(line, file=sys.stderr,
                                                                     flush=True))

    def start(self) -> WorkerRelay:
        self._loop = _Loop("localmed-worker-relay")
        self._loop.said = lambda line: self.said(f"refused {line}")
        self._server = self._loop.run(asyncio.start_server(
            self._link, self.host, self.port, ssl=self.context, ssl_handshake_timeout=30,
            reuse_address=True))
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(self.info.to_line())
            await writer.drain()
            request = await asyncio.wait_for(reader.readline(), 60)
            if request != b"link\n":
                writer.close()
                return
            backend = await asyncio.open_connection("127.0.0.1", self.backend, limit=CHUNK)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            writer.close()
            return
        await _both_ways((reader, writer), backend)

    def close(self) -> None:
        self._server.close()
        self._loop.stop()


class ClientRelay:
    """The engine's side: its llama.cpp connects to :attr:`endpoint` on loopback, and each
    connection is carried to ``worker`` over TLS."""

    def __init__(self, worker: Worker, context: ssl.SSLContext) -> None:
        self.worker, self.context = worker, context
        self._loop = _Loop("localmed-rpc-relay")
        self._server = self._loop.run(asyncio.start_server(self._link, "127.0.0.1", 0))
        port = self._server.sockets[0].getsockname()[1]
        self.endpoint = f"127.0.0.1:{port}"

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            remote = await asyncio.wait_for(asyncio.open_connection(
                self.worker.host, self.worker.port, ssl=self.context, limit=CHUNK,
                server_hostname=self.worker.host), PROBE_SECONDS)
            await asyncio.wait_for(remote[0].readline(), PROBE_SECONDS)  # its greeting
            remote[1].write(b"link\n")
            await remote[1].drain()
        except (OSError, ssl.SSLError, asyncio.TimeoutError) as exc:
            print(f"localmed: worker {self.worker} cannot be linked: {exc}", file=sys.stderr,
                  flush=True)
            writer.close()
            return
        # llama.cpp aborts the engine when a link drops under it: this line (in the engine's
        # log, before llama.cpp's) names the worker in the error that follows
        await _both_ways((reader, writer), remote, lambda: print(
            f"localmed: worker {self.worker} closed the link", file=sys.stderr, flush=True))

    def close(self) -> None:
        self._server.close()
        self._loop.stop()
