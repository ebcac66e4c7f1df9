"""``serve --self-signed``: a TLS key pair made once for this machine, for a ward without hospital
IT's certificate. Clients pin its SHA-256 fingerprint (or trust the certificate file itself).

Made with the ``cryptography`` package: an ECDSA P-256 key (0600) and a certificate valid for
two years, for ``localhost``, this machine's name and the addresses given, kept in the
configuration folder and reused at every start (a fingerprint that changed would be a warning
sign to the clients that pinned it).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import ssl
from pathlib import Path

from localmed import paths
from localmed.atomic import write_text_atomic
from localmed.certificates import self_signed
from localmed.errors import ServeError

VALID_DAYS = 730


def self_signed_pair(hosts: list[str]) -> tuple[Path, Path, bool]:
    """The certificate and key in ``<config dir>/tls``, made if absent (or expired); whether
    they were made now."""
    folder = paths.config_dir() / "tls"
    cert, key = folder / "localmed-serve.pem", folder / "localmed-serve.key"
    if cert.is_file() and key.is_file():
        expires = not_valid_after(cert)
        if expires is not None and expires > dt.datetime.now(dt.timezone.utc):
            return cert, key, False
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    cert_pem, key_pem = _make(hosts)
    write_text_atomic(key, key_pem, mode=0o600)
    write_text_atomic(cert, cert_pem, mode=0o644)
    return cert, key, True


def not_valid_after(cert: Path) -> dt.datetime | None:
    """When the first certificate in a PEM file (a server's own, before any chain) expires;
    None where the file does not read as PEM certificates."""
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificates(cert.read_bytes())[0].not_valid_after_utc
    except (ValueError, OSError):
        return None


def _make(hosts: list[str]) -> tuple[str, str]:
    from cryptography import x509

    names: list[x509.GeneralName] = [x509.DNSName("localhost"),
                                     x509.DNSName(socket.gethostname())]
    for host in hosts:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            names.append(x509.DNSName(host))
            continue
        if not address.is_unspecified:
            names.append(x509.IPAddress(address))
    names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    return self_signed(f"localmed serve on {socket.gethostname()}", VALID_DAYS, [
        (x509.SubjectAlternativeName(list(dict.fromkeys(names))), False),
        (x509.BasicConstraints(ca=False, path_length=None), True)])


def fingerprint(cert: Path) -> str:
    """SHA-256 of the certificate (DER), as browsers and ``openssl x509 -fingerprint`` show it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    digest = x509.load_pem_x509_certificate(cert.read_bytes()).fingerprint(hashes.SHA256())
    return ":".join(f"{b:02X}" for b in digest)


def check_not_expired(cert: Path) -> None:
    """Refuse a server certificate past its end date (the first in the file: the server's own,
    before any chain), read with ``cryptography``. A file it cannot read as PEM certificates is
    left to ``load_cert_chain``, which says what is wrong with it."""
    expires = not_valid_after(cert)
    if expires is not None and expires < dt.datetime.now(dt.timezone.utc):
        raise ServeError(f"--tls-cert {cert}: expired on {expires:%Y-%m-%d %H:%M} UTC; ask for "
                         "a new one")


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context over ``cert`` and ``key`` (PEM), TLS 1.2 and newer; each way they can
    be wrong is one line."""
    for what, path in (("--tls-cert", cert), ("--tls-key", key)):
        if not path.is_file():
            raise ServeError(f"{what} {path}: no such file")
    check_not_expired(cert)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        why = ("the key does not belong to the certificate" if "KEY_VALUES_MISMATCH" in str(exc)
               else f"not a PEM certificate and its key ({exc.reason or exc})")
        raise ServeError(f"--tls-cert {cert} / --tls-key {key}: {why}") from None
    except OSError as exc:
        raise ServeError(f"--tls-cert {cert} / --tls-key {key}: {exc.strerror or exc}") from None
    return context
