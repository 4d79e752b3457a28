"""canary.runtime.tune_tls_reads: TLS connections that read and buffer 64 KiB at a time, not
256 KiB each from the moment they are made (issue 13's RSS: ~45 API connections at 1,000
rollouts), with what they carry unchanged."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from support.probe import run_probe

from canary.runtime import TLS_READ_BYTES

# A loopback TLS server sends 3 MiB of random bytes; the client, made after the tuning,
# reads them all. What its TLS protocol holds, and whether the bytes came whole.
_PROBE = """
import asyncio, hashlib, json, os, ssl, sys
from canary.runtime import tune_tls_reads
tune_tls_reads()
cert, key = sys.argv[1], sys.argv[2]
payload = os.urandom(3 << 20)

async def main():
    async def serve(reader, writer):
        writer.write(payload)
        await writer.drain()
        writer.close()
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_tls)
    port = server.sockets[0].getsockname()[1]
    client_tls = ssl.create_default_context(cafile=cert)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_tls, server_hostname="localhost"
    )
    proto = writer.transport._ssl_protocol
    got = await reader.read()
    buffered = len(proto._ssl_buffer)  # made with the connection (3.11), or by its reads
    writer.close()
    server.close()
    await server.wait_closed()
    return {"buffer": buffered, "max_size": proto.max_size,
            "whole": hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()}

print(json.dumps(asyncio.run(main())))
"""


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    where = tmp_path_factory.mktemp("tls")
    crt, key = where / "tls.crt", where / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-subj", "/CN=localhost", "-addext",
         "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(crt)],
        capture_output=True, check=True, timeout=60,
    )  # fmt: skip
    return crt, key


def _probe(cert: tuple[Path, Path], **env: str) -> dict[str, object]:
    # A process of its own: the setting is process-wide.
    return run_probe(_PROBE, str(cert[0]), str(cert[1]), **env)


def test_tls_connections_buffer_64_kib_and_carry_every_byte(cert: tuple[Path, Path]) -> None:
    assert _probe(cert) == {"buffer": TLS_READ_BYTES, "max_size": TLS_READ_BYTES, "whole": True}


def test_canary_tls_defaults_leaves_pythons_buffers(cert: tuple[Path, Path]) -> None:
    probe = _probe(cert, CANARY_TLS_DEFAULTS="1")
    assert probe["whole"] is True
    assert probe["buffer"] == probe["max_size"]
    assert isinstance(probe["buffer"], int) and probe["buffer"] > TLS_READ_BYTES
