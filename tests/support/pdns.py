"""A real pdns_server on loopback for tests: gsqlite3 backend, HTTP API, LUA records on.

The server is canary.demo.procs.PowerDNSProcess, started through the module's process pool so
it is stopped by PID and the session's leak check sees it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from canary.demo.procs import PowerDNSProcess, find_binary
from support.pool import ProcessPool

API_KEY = "canary-test-key"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PdnsServer:
    dns_port: int
    api_url: str
    zone: str = "example.test."


@pytest.fixture(scope="module")
def pdns(
    tmp_path_factory: pytest.TempPathFactory, module_procs: ProcessPool
) -> Iterator[PdnsServer]:
    try:
        binary = find_binary("pdns_server", fallbacks=("/usr/sbin/pdns_server",))
    except FileNotFoundError as exc:
        pytest.fail(f"{exc} (scripts/setup --all)")
    process = PowerDNSProcess(
        workdir=tmp_path_factory.mktemp("pdns"), api_key=API_KEY, binary=binary
    )
    server = PdnsServer(dns_port=process.dns_port, api_url=process.api_url)
    module_procs.start(process)
    try:
        process.create_zone_sync(server.zone)
        yield server
    finally:
        module_procs.stop(process)
