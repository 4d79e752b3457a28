"""HAProxyRouter against a real HAProxy with two real backend servers on loopback.

Weights are checked twice: as HAProxy reports them (`show servers state`) and as the split
of real requests sent through the frontend, counted by which server answered.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from support.pool import ProcessPool

from canary.demo.procs import HAProxyConfig, HAProxyProcess, free_port
from canary.routers.base import (
    RouterError,
    RouterRejected,
    RouterUnreachable,
    TrafficRouter,
    set_and_verify,
)
from canary.routers.haproxy import HAProxyRouter, parse_servers_state, runtime_command

REQUESTS = 400


@dataclass
class Stack:
    haproxy: HAProxyProcess
    config: HAProxyConfig

    def router(self, **kwargs: object) -> HAProxyRouter:
        options: dict[str, object] = {
            "backend": "app",
            "primary_server": "primary",
            "canary_server": "canary",
            "state_file": self.config.state_file,
        }
        options.update(kwargs)
        return HAProxyRouter(self.config.socket_path, **options)  # type: ignore[arg-type]


def _start_stack(pool: ProcessPool, workdir: Path, sockdir: Path, binary: str) -> Stack:
    primary_port, canary_port = free_port(), free_port()
    pool.support_server("name", primary_port, "primary")
    pool.support_server("name", canary_port, "canary")
    config = HAProxyConfig(
        frontend_port=free_port(),
        primary_addr=f"127.0.0.1:{primary_port}",
        canary_addr=f"127.0.0.1:{canary_port}",
        socket_path=sockdir / "admin.sock",
        state_file=workdir / "server-state",
    )
    haproxy = HAProxyProcess(config, workdir=workdir, binary=binary)
    pool.start(haproxy)
    return Stack(haproxy, config)


@pytest.fixture(scope="module")
def stack(
    module_procs: ProcessPool,
    module_sockdir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    haproxy_binary: str,
) -> Iterator[Stack]:
    yield _start_stack(
        module_procs, tmp_path_factory.mktemp("haproxy"), module_sockdir, haproxy_binary
    )


async def count_split(url: str, n: int = REQUESTS) -> Counter[str]:
    """Send n requests through the frontend; count which server answered each."""
    seen: Counter[str] = Counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for _ in range(n):
            async with session.get(url) as resp:
                assert resp.status == 200, await resp.text()
                seen[(await resp.text()).strip()] += 1
    return seen


# --- weights, read back and measured --------------------------------------------------------


@pytest.mark.parametrize("percent", [0, 5, 25, 50, 100])
async def test_weight_reads_back_and_splits_real_traffic(stack: Stack, percent: int) -> None:
    """A weight set is read back exactly, and real requests split within 3 points of it."""
    router = stack.router()
    assert isinstance(router, TrafficRouter)
    assert await set_and_verify(router, percent) == percent
    assert await router.weights() == {"primary": 100 - percent, "canary": percent}

    seen = await count_split(stack.haproxy.url)
    assert sum(seen.values()) == REQUESTS
    assert set(seen) <= {"primary", "canary"}
    share = 100 * seen["canary"] / REQUESTS
    if percent in (0, 100):
        assert share == percent  # weight 0 drains a server completely
    else:
        assert abs(share - percent) <= 3, f"canary got {share:.1f}% of traffic at weight {percent}"


async def test_split_follows_each_change_at_once(stack: Stack) -> None:
    """Right after a change the next 200 requests already split as set (no scheduler burst).

    Lowering one server before raising the other made HAProxy's roundrobin send ~200
    requests in a row to the raised server (25 -> 50 gave the canary 75% of the next 400).
    """
    router = stack.router()
    for before, after in [(25, 50), (50, 25), (5, 50), (100, 10), (10, 90), (90, 5)]:
        await set_and_verify(router, before)
        await count_split(stack.haproxy.url, 333)  # leave the scheduler mid-cycle
        await set_and_verify(router, after)
        seen = await count_split(stack.haproxy.url, 200)
        share = 100 * seen["canary"] / 200
        assert abs(share - after) <= 3, f"{before} -> {after}: canary got {share:.1f}%"


async def test_many_rollouts_at_once_get_every_command_through(stack: Stack) -> None:
    """500 routers on one admin socket at once (500 rollouts starting, issue 13): HAProxy
    drops connections past its `stats maxconn` (29 of 50 commands at once were lost before
    the per-socket limit), so every weight write and read must still go through."""
    routers = [stack.router() for _ in range(500)]
    results = await asyncio.gather(
        *(r.set_weight(i % 2 * 10) for i, r in enumerate(routers)), return_exceptions=True
    )
    failed = [r for r in results if isinstance(r, BaseException)]
    assert not failed, f"{len(failed)} of 500 refused, e.g. {failed[0]}"
    reads = await asyncio.gather(*(r.get_weight() for r in routers), return_exceptions=True)
    assert all(w in (0, 10) for w in reads), [w for w in reads if w not in (0, 10)][:3]


async def test_weight_changes_under_load_lose_no_request(stack: Stack) -> None:
    """Flipping weights between extremes while requests flow never leaves no server to serve."""
    router = stack.router()
    await set_and_verify(router, 0)
    done = asyncio.Event()

    async def flip() -> None:
        try:
            for percent in [100, 0, 100, 50, 0, 100, 0] * 3:
                await router.set_weight(percent)
                await asyncio.sleep(0.01)
        finally:
            done.set()

    statuses: Counter[int] = Counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        flipper = asyncio.create_task(flip())
        try:
            while not done.is_set():
                async with session.get(stack.haproxy.url) as resp:
                    statuses[resp.status] += 1
        finally:
            await flipper
    assert set(statuses) == {200}, statuses
    assert await router.get_weight() == 0


async def test_each_weight_saves_the_state_file(stack: Stack) -> None:
    """After set_weight the server-state file holds the new weights."""
    router = stack.router()
    await router.set_weight(10)
    rows = parse_servers_state(stack.config.state_file.read_text())
    weights = {r["srv_name"]: r["srv_uweight"] for r in rows if r["be_name"] == "app"}
    assert weights == {"primary": "90", "canary": "10"}


async def test_unwritable_state_file_is_a_router_error(stack: Stack, tmp_path: Path) -> None:
    """A state file that cannot be written is a RouterError naming it; the weight still took."""
    router = stack.router(state_file=tmp_path / "no-such-dir" / "state")
    with pytest.raises(RouterError, match="no-such-dir/state not written"):
        await router.set_weight(15)
    assert await router.get_weight() == 15


async def test_router_name_defaults_to_the_backend(stack: Stack) -> None:
    """The router names itself after its backend unless told otherwise."""
    assert stack.router().name == "haproxy:app"
    assert stack.router(name="checkout").name == "checkout"


# --- HAProxy's errors, typed -------------------------------------------------------------------


async def test_unknown_server_is_rejected_with_haproxys_words(stack: Stack) -> None:
    """A server name HAProxy doesn't know gives RouterRejected carrying 'No such server.'."""
    router = stack.router(canary_server="nope")
    with pytest.raises(RouterRejected) as caught:
        await router.set_weight(50)
    assert "No such server." in caught.value.server_message
    assert "app/nope" in caught.value.command


async def test_unknown_backend_is_rejected_with_haproxys_words(stack: Stack) -> None:
    """A backend HAProxy doesn't know: 'No such backend.' on set, "Can't find backend." on get."""
    router = stack.router(backend="nope")
    with pytest.raises(RouterRejected) as on_set:
        await router.set_weight(50)
    assert "No such backend." in on_set.value.server_message
    with pytest.raises(RouterRejected) as on_get:
        await router.get_weight()
    assert "Can't find backend." in on_get.value.server_message


async def test_get_weight_names_a_server_missing_from_the_backend(stack: Stack) -> None:
    """Reading weights for a server not in the backend says which and lists what exists."""
    router = stack.router(primary_server="gone")
    with pytest.raises(RouterRejected, match="no server gone in backend app"):
        await router.get_weight()


async def test_bare_newline_is_the_only_success(stack: Stack) -> None:
    """HAProxy answers an accepted command with a bare newline and anything else with text."""
    sock = stack.config.socket_path
    assert await runtime_command(sock, "set weight app/primary 100") == "\n"
    answer = await runtime_command(sock, "set weight app/primary 300")
    assert answer.strip() == "Absolute weight can only be between 0 and 256 inclusive."


async def test_missing_socket_is_unreachable(tmp_path: Path) -> None:
    """No socket file: RouterUnreachable naming the path, for set and get alike."""
    router = HAProxyRouter(tmp_path / "absent.sock", "app", "primary", "canary")
    with pytest.raises(RouterUnreachable, match=r"absent\.sock does not exist"):
        await router.set_weight(5)
    with pytest.raises(RouterUnreachable, match=r"absent\.sock"):
        await router.get_weight()


async def test_refused_connection_is_unreachable(sockdir: Path) -> None:
    """A socket file nobody listens on (HAProxy died): RouterUnreachable."""
    import socket

    path = sockdir / "dead.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))  # bound, never listening: connect is refused
    router = HAProxyRouter(path, "app", "primary", "canary")
    with pytest.raises(RouterUnreachable, match=r"dead\.sock"):
        await router.get_weight()


async def test_silent_socket_times_out_as_unreachable(sockdir: Path) -> None:
    """A socket that accepts but never answers: RouterUnreachable after the timeout."""
    accepted = asyncio.Event()

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        await reader.read()  # until the client gives up and closes
        writer.close()

    path = sockdir / "silent.sock"
    server = await asyncio.start_unix_server(hang, path=str(path))
    try:
        router = HAProxyRouter(path, "app", "primary", "canary", timeout_s=0.2)
        with pytest.raises(RouterUnreachable, match="no answer"):
            await router.get_weight()
        assert accepted.is_set()
    finally:
        server.close()
        await server.wait_closed()


async def test_closing_without_an_answer_is_not_success(sockdir: Path) -> None:
    """A socket that closes without even the bare newline: RouterUnreachable, not success."""
    table = "1\n# be_name srv_name srv_uweight\napp primary 100\napp canary 0\n"

    async def mute_on_set(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        command = (await reader.readline()).decode()
        if command.startswith("show servers state") and answer_show:
            writer.write(table.encode())
        writer.close()

    path = sockdir / "mute.sock"
    server = await asyncio.start_unix_server(mute_on_set, path=str(path))
    try:
        router = HAProxyRouter(path, "app", "primary", "canary")
        answer_show = True
        assert await router.get_weight() == 0
        with pytest.raises(RouterUnreachable, match="closed without answering 'set weight"):
            await router.set_weight(5)
        answer_show = False
        with pytest.raises(RouterUnreachable, match="closed without answering 'show servers"):
            await router.get_weight()
    finally:
        server.close()
        await server.wait_closed()


# --- reloads --------------------------------------------------------------------------------


async def test_weights_survive_a_reload(
    procs: ProcessPool, workdir: Path, sockdir: Path, haproxy_binary: str
) -> None:
    """After a reload the weights come back from the server-state file, not the config."""
    stack = _start_stack(procs, workdir, sockdir, haproxy_binary)
    router = stack.router()
    assert stack.config.canary_weight == 0  # what the config file alone would give
    await set_and_verify(router, 25)
    master = stack.haproxy.pid

    await stack.haproxy.reload()
    assert stack.haproxy.pid == master  # same supervised master, new worker
    assert await router.get_weight() == 25
    seen = await count_split(stack.haproxy.url)
    assert abs(100 * seen["canary"] / REQUESTS - 25) <= 3

    # Control: a weight set without saving is lost on a reload that doesn't save first.
    unsaved = stack.router(state_file=None)
    await set_and_verify(unsaved, 40)
    await stack.haproxy.reload(save_state=False)
    assert await router.get_weight() == 25


# --- input checks and parsing ------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1, 101])
async def test_out_of_range_weight_is_refused_before_any_command(bad: int, tmp_path: Path) -> None:
    """Weights outside 0..100 raise ValueError naming the value, without touching HAProxy."""
    router = HAProxyRouter(tmp_path / "absent.sock", "app", "primary", "canary")
    with pytest.raises(ValueError, match=f"got {bad}"):
        await router.set_weight(bad)


@pytest.mark.parametrize(
    ("field", "value"),
    [("backend", ""), ("primary_server", "a b"), ("canary_server", "x/y"), ("backend", "a;b")],
)
def test_bad_names_are_refused(field: str, value: str) -> None:
    """Names that would break or smuggle a runtime command are refused, naming the field."""
    args = {"backend": "app", "primary_server": "primary", "canary_server": "canary"}
    args[field] = value
    with pytest.raises(ValueError, match=field):
        HAProxyRouter("/nonexistent.sock", **args)


def test_servers_state_columns_are_found_by_name() -> None:
    """parse_servers_state keys rows by the header's names, whatever the column order."""
    text = "1\n# srv_uweight be_name srv_name\n7 app canary\n93 app primary\n"
    assert parse_servers_state(text) == [
        {"srv_uweight": "7", "be_name": "app", "srv_name": "canary"},
        {"srv_uweight": "93", "be_name": "app", "srv_name": "primary"},
    ]


@pytest.mark.parametrize(
    "text", ["", "Can't find backend.\n", "2\n# be_name\napp\n", "1\n# a b c\nx y\n"]
)
def test_servers_state_rejects_what_it_cannot_read(text: str) -> None:
    """Unknown versions, missing headers and short rows raise ValueError, not a wrong weight."""
    with pytest.raises(ValueError):
        parse_servers_state(text)
