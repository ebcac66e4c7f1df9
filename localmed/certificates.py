"""A self-signed certificate and its key, made one way for ``serve --self-signed``
(:mod:`localmed.serve.tls`) and the clinic's RPC secret (:mod:`localmed.rpc.secret`): an ECDSA
P-256 key, SHA-256, valid from five minutes ago (a clock a little behind still accepts it)."""

from __future__ import annotations

import datetime as dt
from typing import Any


def self_signed(common_name: str, days: int, extensions: list[tuple[Any, bool]]
                ) -> tuple[str, str]:
    """(certificate, key) in PEM for ``common_name``, valid ``days``, with ``extensions``
    ((a ``cryptography`` extension, critical) each)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(subject).issuer_name(subject)
               .public_key(private.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=days)))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    certificate = builder.sign(private, hashes.SHA256())
    key = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return certificate.public_bytes(serialization.Encoding.PEM).decode(), key
