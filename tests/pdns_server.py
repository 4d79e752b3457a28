"""A real pdns_server on loopback for tests: gsqlite3 backend, HTTP API, LUA records on."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

SCHEMA = Path("/usr/share/doc/pdns-backend-sqlite3/schema.sqlite3.sql")
API_KEY = "canary-test-key"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _free_port_both() -> int:
    """A port free for both UDP and TCP, since pdns listens on both."""
    for _ in range(50):
        port = free_port(socket.SOCK_DGRAM)
        with socket.socket() as tcp:
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free UDP+TCP port")


@dataclass
class PdnsServer:
    dns_port: int
    api_url: str
    zone: str = "example.test."


@pytest.fixture(scope="module")
def pdns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PdnsServer]:
    binary = shutil.which("pdns_server") or "/usr/sbin/pdns_server"
    assert os.path.exists(binary), "pdns_server is missing: run scripts/setup --all"
    workdir = tmp_path_factory.mktemp("pdns")
    db = workdir / "pdns.sqlite3"
    with sqlite3.connect(db) as conn:
        conn.executescript(SCHEMA.read_text())
    dns_port, api_port = _free_port_both(), free_port()
    (workdir / "pdns.conf").write_text(
        "\n".join(
            [
                "launch=gsqlite3",
                f"gsqlite3-database={db}",
                "local-address=127.0.0.1",
                f"local-port={dns_port}",
                "api=yes",
                f"api-key={API_KEY}",
                "webserver=yes",
                "webserver-address=127.0.0.1",
                f"webserver-port={api_port}",
                "webserver-allow-from=127.0.0.0/8",
                "enable-lua-records=yes",
                # Every answer is computed afresh, so the split we count is pickwrandom's own.
                "cache-ttl=0",
                "query-cache-ttl=0",
                "negquery-cache-ttl=0",
                "zone-cache-refresh-interval=0",
                f"socket-dir={workdir}",
                "guardian=no",
                "daemon=no",
                "disable-syslog=yes",
                "write-pid=no",
                "loglevel=4",
            ]
        )
        + "\n"
    )
    log = (workdir / "pdns.log").open("w")
    proc = subprocess.Popen(
        [binary, f"--config-dir={workdir}"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        api_url = f"http://127.0.0.1:{api_port}"
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"pdns_server exited: {(workdir / 'pdns.log').read_text()[-2000:]}"
                )
            try:
                with socket.create_connection(("127.0.0.1", api_port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("pdns_server API did not come up") from None
                time.sleep(0.1)
        server = PdnsServer(dns_port=dns_port, api_url=api_url)
        asyncio.run(_create_zone(server))
        yield server
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


async def _create_zone(server: PdnsServer) -> None:
    zone = {
        "name": server.zone,
        "kind": "Native",
        "nameservers": [],
        "rrsets": [
            {
                "name": server.zone,
                "type": "SOA",
                "ttl": 60,
                "records": [
                    {
                        "content": "ns1.example.test. hostmaster.example.test. 1 10800 3600 604800 60",
                        "disabled": False,
                    }
                ],
            },
            {
                "name": server.zone,
                "type": "NS",
                "ttl": 60,
                "records": [{"content": "ns1.example.test.", "disabled": False}],
            },
        ],
    }
    async with (
        aiohttp.ClientSession(headers={"X-API-Key": API_KEY}) as session,
        session.post(f"{server.api_url}/api/v1/servers/localhost/zones", json=zone) as response,
    ):
        assert response.status == 201, await response.text()
