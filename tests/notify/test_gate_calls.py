"""GateCaller against a real aiohttp receiver on 127.0.0.1: Flagger's payload, the answer as
(ok, detail), retries, timeouts, and the notification webhooks' address rules."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from canary.demo.procs import free_port
from canary.notify.gates import GateCaller, GateConfig, parse_metadata

pytestmark = pytest.mark.timeout(60)


class Receiver:
    def __init__(self) -> None:
        self.port = free_port()
        self.answers: list[int | str] = []  # per call: a status, "slow" or "redirect"
        self.payloads: list[dict[str, Any]] = []

    def url(self, path: str = "hook") -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    async def hook(self, request: web.Request) -> web.StreamResponse:
        self.payloads.append(await request.json())
        answer = self.answers.pop(0) if self.answers else 200
        if answer == "slow":
            await asyncio.sleep(5)
            return web.Response()
        if answer == "redirect":
            raise web.HTTPTemporaryRedirect(self.url("elsewhere"))
        return web.Response(status=int(answer))


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    got = Receiver()
    app = web.Application()
    app.router.add_post("/{name}", got.hook)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", got.port).start()
    try:
        yield got
    finally:
        await runner.cleanup()


async def ask(caller: GateCaller, kind: str = "confirm-promotion") -> tuple[bool, str]:
    try:
        return await caller.ask(
            kind, name="app", namespace="shop", phase="Progressing", checksum="abc"
        )
    finally:
        await caller.aclose()


async def test_payload_is_flaggers_with_metadata_verbatim(receiver: Receiver) -> None:
    """A 2xx is ok; the payload is {name, namespace, phase, checksum, type, metadata}."""
    metadata = {"url": "http://app-canary/", "cmd": "hey -z 1m"}
    gate = GateConfig(type="rollout", url=receiver.url(), metadata=metadata)
    assert await ask(GateCaller([gate], allow_hosts=["127.0.0.1"]), "rollout") == (True, "HTTP 200")
    assert receiver.payloads == [
        {
            "name": "app",
            "namespace": "shop",
            "phase": "Progressing",
            "checksum": "abc",
            "type": "rollout",
            "metadata": metadata,
        }
    ]


async def test_a_load_test_hooks_answer_names_the_load(receiver: Receiver) -> None:
    """A rollout hook with `rps` in its metadata is a load test: its 2xx answer says what load
    (host only: no credentials or query), so the record and the report show it."""
    metadata = {"url": "http://u:secret@app-canary.shop:8080/x?token=t", "rps": "50"}
    gate = GateConfig(type="rollout", url=receiver.url(), metadata={**metadata, "duration": "30s"})
    caller = GateCaller([gate], allow_hosts=["127.0.0.1"])
    answer = (True, "load test: 50 req/s to app-canary.shop:8080 for 30s; HTTP 200")
    assert await ask(caller, "rollout") == answer
    assert receiver.payloads[0]["metadata"]["url"] == metadata["url"]  # verbatim to the receiver
    canary_only = GateConfig(
        type="rollout", url=receiver.url(), metadata={"rps": "5", "at": "canary"}
    )
    answer = (True, "load test: 5 req/s (canary only); HTTP 200")
    assert await ask(GateCaller([canary_only], allow_hosts=["127.0.0.1"]), "rollout") == answer


async def test_loopback_is_refused_without_the_allow_list(receiver: Receiver) -> None:
    """As for notifications: 127.0.0.1 is refused unless allowed, and nothing is sent."""
    gate = GateConfig(type="confirm-promotion", url=receiver.url())
    ok, detail = await ask(GateCaller([gate]))
    assert not ok and "loopback" in detail and receiver.payloads == []


async def test_redirects_are_not_followed_and_4xx_is_not_retried(receiver: Receiver) -> None:
    """A 307 is a "no" (the POST is not repeated elsewhere); a 403 is a "no" at once."""
    gate = GateConfig(type="confirm-promotion", url=receiver.url(), retries=3)
    receiver.answers = ["redirect"]
    ok, detail = await ask(GateCaller([gate], allow_hosts=["127.0.0.1"]))
    assert not ok and "redirect, not followed" in detail and len(receiver.payloads) == 1
    receiver.answers = [403]
    ok, detail = await ask(GateCaller([gate], allow_hosts=["127.0.0.1"]))
    assert (ok, len(receiver.payloads)) == (False, 2) and detail.startswith("HTTP 403")


async def test_5xx_and_timeouts_are_retried_then_answer(receiver: Receiver) -> None:
    """No answer in time and 5xx are tried `retries` more times; the last answer counts."""
    gate = GateConfig(type="pre-rollout", url=receiver.url(), retries=2, timeout_s=0.5)
    receiver.answers = [500, "slow", 200]
    assert await ask(GateCaller([gate], allow_hosts=["127.0.0.1"]), "pre-rollout") == (
        True,
        "HTTP 200",
    )
    assert len(receiver.payloads) == 3
    receiver.answers = ["slow", "slow", "slow"]
    ok, detail = await ask(GateCaller([gate], allow_hosts=["127.0.0.1"]), "pre-rollout")
    assert not ok and "no answer within 0.5s" in detail


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ('{"a": 1}', "values must be strings"),
        ("[1]", "must be an object of strings"),
        ("{", "must be a JSON object of strings"),
        ({f"k{i}": "v" for i in range(33)}, "at most 32"),
        ({"k": "v" * 5000}, "at most 4096"),
    ],
)
def test_metadata_is_bounded(value: object, rule: str) -> None:
    """Metadata is a small JSON object of strings; anything else is refused with the rule."""
    with pytest.raises(ValueError, match=rule):
        parse_metadata(value)
