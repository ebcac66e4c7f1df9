"""``--rpc HOST:PORT[,HOST:PORT...]``: the workers a model's layers go to, checked before
anything is sent: well formed, on the clinic's own network (never a public address), each a
worker this machine can use (:func:`~localmed.rpc.link.probe`). The offline guard then lets
exactly these workers through, and nothing else."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

from localmed import offline
from localmed.errors import WorkerError
from localmed.rpc import DEFAULT_PORT, secret
from localmed.rpc.link import ClientRelay, Worker, WorkerInfo, probe

INSECURE = ("--insecure-rpc: the model's weights and activations cross the network in clear, "
            "to whoever answers")
"""What a client with ``--insecure-rpc`` is warned of."""


def parse(text: str) -> tuple[Worker, ...]:
    """``--rpc``'s value; one line for what is wrong with it."""
    workers: list[Worker] = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            raise WorkerError(f"--rpc {text!r}: an empty entry (HOST:PORT, comma-separated)")
        host, sep, port = entry.rpartition(":")
        if not sep:
            host, port = entry, str(DEFAULT_PORT)
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise WorkerError(f"--rpc {entry!r}: expected HOST:PORT (a port from 1 to 65535)")
        worker = Worker(host, int(port))
        if worker in workers:
            raise WorkerError(f"--rpc: {worker} is listed twice")
        workers.append(worker)
    return tuple(workers)


def addresses(worker: Worker) -> list[str]:
    """The addresses ``worker``'s name stands for, a public one refused (a literal address
    before anything is asked of the network)."""
    try:
        found = {str(ipaddress.ip_address(worker.host))}
    except ValueError:
        offline.allow({worker.host})  # its name may be looked up
        try:
            found = {info[4][0] for info in socket.getaddrinfo(worker.host, worker.port,
                                                                 type=socket.SOCK_STREAM)}
        except socket.gaierror as exc:
            raise WorkerError(f"worker {worker}: {worker.host!r} is not a name this machine "
                              f"knows ({exc.strerror})") from None
    for address in sorted(found):
        if ipaddress.ip_address(address.split("%")[0]).is_global:
            raise WorkerError(f"worker {worker}: {address} is a public address; workers must "
                              "be on the clinic's own network (a private, link-local or "
                              "loopback address)")
    return sorted(found)


def check(workers: tuple[Worker, ...], *, insecure: bool = False,
          secret_path: Path | None = None) -> tuple[WorkerInfo, ...]:
    """Each worker's own account of itself, or one line on the first that cannot be used.
    The offline guard (where it runs) lets these workers through from now on."""
    names: set[str] = set()
    for worker in workers:
        names |= {worker.host, *addresses(worker)}
    offline.allow(names)
    context = None if insecure else secret.client_context(secret_path)
    return tuple(probe(worker, context, secret_path or secret.default_path())
                 for worker in workers)


def spec(rpc: str | None, insecure: bool = False, secret_path: Path | None = None
         ) -> Workers | None:
    """``--rpc``, ``--insecure-rpc`` and ``--rpc-secret`` as given; None without ``--rpc``."""
    if not rpc:
        if insecure or secret_path:
            raise WorkerError("--insecure-rpc and --rpc-secret go with --rpc HOST:PORT")
        return None
    return Workers(parse(rpc), insecure, secret_path)


_RELAYS: dict[Workers, tuple[str, ...]] = {}


def endpoints(spec: Workers) -> tuple[tuple[str, ...], bool]:
    """Where this process's llama.cpp reaches the workers: a relay on loopback for each (their
    own addresses with ``--insecure-rpc``), made once per process and kept (ggml keeps a
    worker's devices registered for the process's life); whether they were made now."""
    if spec in _RELAYS:
        return _RELAYS[spec], False
    if spec.insecure:
        found = tuple(str(w) for w in spec.workers)
    else:
        context = secret.client_context(spec.secret)
        found = tuple(ClientRelay(worker, context).endpoint for worker in spec.workers)
    _RELAYS[spec] = found
    return found, True


@dataclass(frozen=True)
class Workers:
    """``--rpc``, ``--insecure-rpc`` and ``--rpc-secret``, as an engine is loaded with them."""

    workers: tuple[Worker, ...]
    insecure: bool = False
    secret: Path | None = None

    def check(self) -> tuple[WorkerInfo, ...]:
        return check(self.workers, insecure=self.insecure, secret_path=self.secret)

    def __str__(self) -> str:
        return ",".join(map(str, self.workers))
