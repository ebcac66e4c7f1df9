"""Nothing leaves the laptop, enforced: in ``chat``, ``serve``, ``bench`` and their engine
processes, every Python socket that would reach beyond this machine is refused.

A Python audit hook (:func:`sys.addaudithook`, PEP 578) sees each ``socket.connect``,
``socket.sendto``/``sendmsg`` and name lookup (``getaddrinfo``, ``gethostbyname``,
``gethostbyaddr``) before it happens, in localmed's code and in every library it loads, and
raises :class:`~localmed.errors.NetworkRefusedError` for anything but loopback (and Unix sockets): one
line, also written to stderr at once (a library may swallow the exception and retry). The hook
cannot be removed once added, and children started with ``spawn`` install it again
(:func:`localmed.runtimes.process.settle_engine_process`). llama.cpp itself opens no socket.

The commands that download (``pull``, ``quantize`` from the hub, ``data pull``) say so and never
install it.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from typing import Any

from localmed.errors import NetworkRefusedError

_guard: _Guard | None = None

LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


class _Guard:
    def __init__(self, command: str, names: frozenset[str]) -> None:
        self.command = command
        self.names = names
        self.said: set[str] = set()

    def local(self, host: Any) -> bool:
        if host is None:
            return True  # getaddrinfo(None, port): the wildcard a server binds
        if isinstance(host, bytes):
            host = host.decode("ascii", "replace")
        host = str(host).split("%")[0].rstrip(".").lower()
        if host in ("", "<broadcast>"):
            return host == ""
        if host in LOCAL_NAMES or host.endswith(".localhost") or host in self.names:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return address.is_loopback or address.is_unspecified

    def refuse(self, what: str) -> None:
        message = (f"{self.command} works offline: {what} was refused (nothing leaves the "
                   "laptop; only pull, quantize from the hub and data pull download)")
        if what not in self.said:
            self.said.add(what)
            print(message, file=sys.stderr, flush=True)
        raise NetworkRefusedError(what, message)

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        if event in ("socket.connect", "socket.sendto", "socket.sendmsg"):
            sock, address = args[0], args[1]
            if address is None or getattr(sock, "family", None) not in (socket.AF_INET,
                                                                        socket.AF_INET6):
                return
            if not self.local(address[0]):
                self.refuse(f"a connection to {address[0]} port {address[1]}")
        elif event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
                       "socket.gethostbyname_ex"):
            host = args[0]
            if not self.local(host):
                port = f" port {args[1]}" if event == "socket.getaddrinfo" and args[1] else ""
                self.refuse(f"a connection to {host}{port}" if _address(host) else
                            f"looking up {host}")


def _address(host: Any) -> bool:
    try:
        ipaddress.ip_address(host.decode() if isinstance(host, bytes) else str(host))
    except ValueError:
        return False
    return True


def enforce(command: str, *, names: frozenset[str] | set[str] = frozenset()) -> None:
    """From now on in this process, refuse any socket beyond loopback (``names``: host names
    this process may look up besides, such as the address ``serve --host`` binds)."""
    global _guard
    if _guard is None:
        _guard = _Guard(command, frozenset(n.lower() for n in names))
        sys.addaudithook(_guard)
    else:
        _guard.command = command
        _guard.names |= {n.lower() for n in names}


def enforced() -> str | None:
    """The command whose offline guard this process runs under, if any."""
    return _guard.command if _guard is not None else None


def allow(names: set[str] | frozenset[str]) -> None:
    """Where the guard runs, let these hosts (names and addresses) through from now on: the
    workers ``--rpc`` lists, and nothing else."""
    if _guard is not None:
        _guard.names |= {n.lower() for n in names}
