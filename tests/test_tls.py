"""TLS: self-signed certificates load and complete a real loopback handshake."""

from __future__ import annotations

import asyncio
import ssl
import stat
from pathlib import Path

import pytest

from orochi_proxy.tls import generate_self_signed, server_ssl_context

pytest.importorskip("cryptography")


@pytest.fixture
def cert_pair(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    generate_self_signed(cert, key)
    return cert, key


def test_generated_cert_loads(cert_pair: tuple[Path, Path]) -> None:
    cert, key = cert_pair
    ctx = server_ssl_context(str(cert), str(key))
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_cert_names_and_validity(cert_pair: tuple[Path, Path]) -> None:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_pair[0].read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 365 <= lifetime.days <= 366


async def _handshake(cert: Path, key: Path, server_hostname: str, host: str) -> tuple[str, bytes]:
    server_ctx = server_ssl_context(str(cert), str(key))

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readexactly(5))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, host, 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    client_ctx = ssl.create_default_context(cafile=str(cert))  # verifies chain and hostname
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=client_ctx, server_hostname=server_hostname),
            10,
        )
        writer.write(b"hello")
        reply = await asyncio.wait_for(reader.readexactly(5), 10)
        version = writer.get_extra_info("ssl_object").version()
        writer.close()
        await writer.wait_closed()
        return version, reply
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1"])
def test_loopback_handshake(cert_pair: tuple[Path, Path], name: str) -> None:
    version, reply = asyncio.run(_handshake(*cert_pair, server_hostname=name, host="127.0.0.1"))
    assert reply == b"hello"
    assert version in ("TLSv1.2", "TLSv1.3")


def test_server_context_refuses_old_protocols(cert_pair: tuple[Path, Path]) -> None:
    ctx = server_ssl_context(*map(str, cert_pair))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_COMPRESSION


def test_wrong_hostname_fails_verification(cert_pair: tuple[Path, Path]) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(_handshake(*cert_pair, server_hostname="example.com", host="127.0.0.1"))
