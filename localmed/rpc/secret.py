"""The clinic's RPC secret: one file, copied by the administrator to each machine that takes
part (workers and the machines that use them).

It holds a key and a certificate made for it (ECDSA P-256, with the ``cryptography`` package).
Both ends of a link present that certificate and trust nothing else (mutual TLS 1.3): a machine
without the file can neither reach a worker nor pose as one, and nothing crosses in clear. The
first ``localmed worker`` on a machine makes it at the default place (0600), which every
command on that machine then reads, so one machine's worker and client need no option.
"""

from __future__ import annotations

import os
import socket
import ssl
from pathlib import Path

from localmed import paths
from localmed.atomic import write_text_atomic
from localmed.certificates import self_signed
from localmed.errors import WorkerError

VALID_YEARS = 20
"""A clinic replaces its secret when a machine leaves it, not on a calendar."""


def default_path() -> Path:
    return paths.config_dir() / "rpc" / "clinic-secret.pem"


def ensure(path: Path | None) -> tuple[Path, bool]:
    """The secret at ``path`` (None: the default place), made there if absent; whether it was
    made now."""
    path = path or default_path()
    if path.exists():
        _check(path)
        return path, False
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, _make(), mode=0o600)
    return path, True


def server_context(path: Path | None) -> ssl.SSLContext:
    """What a worker's relay accepts: TLS 1.3, a client holding the clinic's secret."""
    return _context(ssl.PROTOCOL_TLS_SERVER, path)


def client_context(path: Path | None) -> ssl.SSLContext:
    """What a client's relay speaks: TLS 1.3, to a worker holding the clinic's secret (the
    certificate is the identity: no host name is checked)."""
    context = _context(ssl.PROTOCOL_TLS_CLIENT, path)
    context.check_hostname = False
    return context


def _context(protocol: int, path: Path | None) -> ssl.SSLContext:
    path = path or default_path()
    _check(path)
    context = ssl.SSLContext(protocol)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_cert_chain(path)
        context.load_verify_locations(cafile=str(path))
    except (ssl.SSLError, OSError) as exc:
        raise WorkerError(f"{path}: not a localmed RPC secret ({exc.strerror or exc})") from None
    return context


def _check(path: Path) -> None:
    if not path.is_file():
        raise WorkerError(f"no RPC secret at {path}: copy the file that the first `localmed "
                          "worker` made (its path is in its banner) to this machine, there or "
                          "given with --rpc-secret")
    text = path.read_text(errors="replace")
    if "PRIVATE KEY-----" not in text or "CERTIFICATE-----" not in text:
        raise WorkerError(f"{path}: not a localmed RPC secret (it needs a key and a "
                          "certificate, as `localmed worker` makes it)")


def _make() -> str:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    certificate, key = self_signed(
        f"localmed clinic RPC (made on {socket.gethostname()})", 365 * VALID_YEARS, [
            # Its own trust anchor, presented by both ends.
            (x509.BasicConstraints(ca=True, path_length=0), True),
            (x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                           content_commitment=False, key_encipherment=False,
                           data_encipherment=False, key_agreement=False, crl_sign=False,
                           encipher_only=False, decipher_only=False), True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                    ExtendedKeyUsageOID.CLIENT_AUTH]), False)])
    return key + certificate


def private(path: Path) -> bool:
    """Whether only its owner can read it."""
    return not os.stat(path).st_mode & 0o077
