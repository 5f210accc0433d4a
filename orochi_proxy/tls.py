"""TLS for client connections to the proxy.

PostgreSQL clients ask for TLS with an SSLRequest before the startup packet; the server
layer answers ``S`` and wraps the socket with the context built here. Self-signed
certificates exist for tests, the demo cluster and ``sslmode=require`` setups where
encryption matters but identity is checked some other way.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from pathlib import Path

__all__ = ["generate_self_signed", "server_ssl_context"]


def server_ssl_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """Server-side context: TLS 1.2 minimum (what PostgreSQL's ``ssl_min_protocol_version``
    defaults to), the default secure cipher list, no client certificates requested."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # Compression opens CRIME-style attacks; renegotiation is not part of the PG protocol.
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


def generate_self_signed(cert_file: Path, key_file: Path, hostname: str = "localhost") -> None:
    """Write a self-signed certificate (valid 1 year) and its private key, both PEM.

    The SAN covers ``hostname``, ``localhost`` and ``127.0.0.1`` so clients with
    ``sslmode=verify-full`` and this cert as root can connect over loopback. ECDSA P-256
    keeps generation instant. Needs the ``cryptography`` package (test extra), imported
    lazily so the proxy itself does not depend on it. The key file is created mode 0600,
    since PostgreSQL-style tooling refuses group/world-readable keys.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    dns_names = dict.fromkeys([hostname, "localhost"])  # ordered, de-duplicated
    san: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    san.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    key_path = Path(key_file)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key_pem)
    os.chmod(key_path, 0o600)  # O_CREAT's mode is ignored if the file already existed
    Path(cert_file).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
