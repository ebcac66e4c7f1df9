"""Where ``localmed serve`` listens: the address checked (beyond this laptop only with API keys,
and over TLS unless plain HTTP is asked for by name) and the socket bound before the model loads,
so a port in use is said in a second, not after a minute."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import sys
from typing import TextIO

from localmed.errors import ServeError
from localmed.serve.keys import KeyRing
from localmed.serve.server import LocalServer


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
