"""The server's guard in static mode (issue 11, point 1): commands and reads need the token,
no cross-origin request gets through, probes and /metrics stay open.

The rollout is a stand-in RolloutSource that keeps the commands it is given, so the tests
see exactly what would reach the rollout task.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from canary.core.rollout import Command
from canary.runner import CommandResult, UnknownRollout
from canary.runner.telemetry import Telemetry
from canary.server.app import Server, make_app
from canary.server.auth import TokenAccess, create_token_file, read_token_file

TOKEN = "s3cret-token-0123456789abcdef"
FORM = {"Content-Type": "application/x-www-form-urlencoded", "Origin": "http://evil.example"}


@dataclass
class FakeSource:
    """A RolloutSource with one rollout, `app`, that accepts every command."""

    started: asyncio.Event = field(default_factory=asyncio.Event)
    telemetry: Telemetry = field(default_factory=Telemetry)
    commands: list[Command] = field(default_factory=list)

    def states(self) -> list[dict[str, Any]]:
        return [{"name": "app", "phase": "Progressing", "step": 0, "weight": 5}]

    async def command(self, name: str, command: Command) -> CommandResult:
        if name != "app":
            raise UnknownRollout(name)
        self.commands.append(command)
        return CommandResult(True, "Paused", "ok")


@dataclass
class Served:
    source: FakeSource
    url: str
    http: aiohttp.ClientSession

    async def call(self, method: str, path: str, **kwargs: Any) -> int:
        async with self.http.request(method, self.url + path, **kwargs) as response:
            await response.read()
            return response.status


@pytest.fixture(params=[False, True], ids=["private-reads", "public-reads"])
async def served(request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    source = FakeSource()
    source.started.set()
    app = make_app(source, access=TokenAccess(TOKEN), public_reads=request.param)
    async with Server(app) as server, aiohttp.ClientSession() as http:
        yield Served(source, server.url, http)


def _auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_a_command_without_credentials_is_401(served: Served) -> None:
    assert await served.call("POST", "/rollouts/app/promote", json={}) == 401
    assert served.source.commands == []


async def test_a_command_with_a_wrong_token_is_401(served: Served) -> None:
    for header in (_auth("x" * 32), _auth(TOKEN[:-1]), {"Authorization": f"Basic {TOKEN}"}):
        assert await served.call("POST", "/rollouts/app/abort", json={}, headers=header) == 401
    assert served.source.commands == []


async def test_a_command_with_the_token_is_accepted(served: Served) -> None:
    body = {"who": "alice", "reason": "looks good"}
    assert await served.call("POST", "/rollouts/app/pause", json=body, headers=_auth()) == 200
    [command] = served.source.commands
    # Static mode's token names nobody: the caller's `who` is kept as a label.
    assert (command.command, command.who, command.reason) == ("pause", "alice", "looks good")


async def test_a_cross_origin_form_post_is_refused_even_with_the_token(served: Served) -> None:
    """What a hostile page can send (a form post from another origin) never reaches the
    rollout: refused for its Origin, and a form body is refused for its Content-Type."""
    form = {"who": "evil"}
    assert await served.call("POST", "/rollouts/app/promote", data=form, headers=FORM) == 403
    assert (
        await served.call("POST", "/rollouts/app/promote", data=form, headers=FORM | _auth()) == 403
    )
    same_site_form = {"Content-Type": "application/x-www-form-urlencoded"} | _auth()
    assert (
        await served.call("POST", "/rollouts/app/promote", data="a=b", headers=same_site_form)
        == 415
    )
    cross_json = {"Origin": "http://evil.example"} | _auth()
    assert await served.call("POST", "/rollouts/app/promote", json={}, headers=cross_json) == 403
    assert served.source.commands == []


async def test_no_cors_is_offered(served: Served) -> None:
    async with served.http.options(
        served.url + "/rollouts/app/promote",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    ) as response:
        assert response.status in (403, 405)
        assert not any(h.lower().startswith("access-control-") for h in response.headers)


async def test_probes_and_metrics_stay_open_reads_follow_the_switch(
    served: Served, request: pytest.FixtureRequest
) -> None:
    public = "public-reads" in request.node.callspec.id
    for path in ("/healthz", "/readyz", "/metrics"):
        assert await served.call("GET", path) == 200
    for path in ("/rollouts", "/rollouts/app"):
        assert await served.call("GET", path) == (200 if public else 401)
        assert await served.call("GET", path, headers=_auth()) == 200
        assert await served.call("GET", path, headers=_auth("y" * 20)) == (200 if public else 401)


def test_the_generated_token_file_is_private_and_never_quoted(tmp_path: Path) -> None:
    path = tmp_path / "records" / "canary.token"
    token = create_token_file(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert read_token_file(path) == token and len(token) >= 32
    path.write_text("short\n")
    with pytest.raises(ValueError) as caught:
        read_token_file(path)
    assert "short" not in str(caught.value)
