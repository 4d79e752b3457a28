"""Webhooks are no way into the controller's network (issue 11, point 3): no redirects, and
no loopback, link-local or API-server address unless the operator allows the host.

Only loopback is ever connected to: the refused addresses (169.254.169.254, the API server's)
are refused before any connection, which the tests check by the notifier never having opened
an HTTP session at all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from canary.notify.webhooks import Notification, Notifier, WebhookConfig, refusal

LOOPBACK = ("127.0.0.1",)


@dataclass
class Receiver:
    url: str = ""
    received: list[Any] = field(default_factory=list)
    status: int = 200
    location: str = ""


async def _serve(rec: Receiver) -> web.AppRunner:
    async def handle(request: web.Request) -> web.Response:
        rec.received.append(await request.read())
        headers = {"Location": rec.location} if rec.location else None
        return web.Response(status=rec.status, text="ok", headers=headers)

    app = web.Application()
    app.router.add_post("/hook", handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    rec.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    return runner


@pytest.fixture
async def two() -> AsyncIterator[tuple[Receiver, Receiver]]:
    first, second = Receiver(), Receiver()
    runners = [await _serve(first), await _serve(second)]
    try:
        yield first, second
    finally:
        for runner in runners:
            await runner.cleanup()


def _notification() -> Notification:
    return Notification(
        event="promoted", rollout="r", target="demo/app", title="t", text="x", at=1.0
    )


def _hook(url: str) -> WebhookConfig:
    return WebhookConfig(url=url, backoff_s=0.01, max_attempts=3, timeout_s=5)


async def test_a_307_redirect_is_a_failed_delivery_not_followed(
    two: tuple[Receiver, Receiver],
) -> None:
    """A receiver answering 307 to a second one: the delivery fails (recorded, once, not
    retried) and the second receiver sees nothing."""
    first, second = two
    first.status, first.location = 307, second.url
    async with Notifier([_hook(first.url)], allow_hosts=LOOPBACK) as notifier:
        assert notifier.notify(_notification()) == 1
        assert await notifier.wait(timeout_s=10)
    [result] = notifier.deliveries
    assert not result.ok and result.status == 307 and result.attempts == 1
    assert result.error is not None and "redirect, not followed" in result.error
    assert len(first.received) == 1 and second.received == []


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[fe80::1]/hook", "link-local"),
        ("http://[::ffff:169.254.169.254]/x", "link-local"),
        ("https://10.96.0.1/api/v1/secrets", "Kubernetes API server"),
        ("http://0.0.0.0:9/hook", "unspecified"),
        ("http://127.0.0.1:9/hook", "loopback"),
        ("http://[::1]:9/hook", "loopback"),
    ],
)
async def test_refused_addresses_are_refused_without_a_connection(
    url: str, why: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The metadata address, the API server ($KUBERNETES_SERVICE_HOST), loopback and the
    unspecified address: a failed delivery naming why, after one attempt, and no HTTP session
    was ever opened (so nothing was sent anywhere)."""
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    async with Notifier([_hook(url)]) as notifier:
        notifier.notify(_notification())
        assert await notifier.wait(timeout_s=10)
        assert notifier._session is None  # no connection was possible
    [result] = notifier.deliveries
    assert not result.ok and result.attempts == 1 and result.status is None
    assert result.error is not None and why in result.error and "refused" in result.error


async def test_a_name_that_resolves_to_loopback_is_refused_by_the_resolver(
    two: tuple[Receiver, Receiver],
) -> None:
    """`localhost` is checked where the connector resolves it (so a DNS answer cannot change
    between the check and the connection): refused, not retried, nothing received."""
    first, _ = two
    url = first.url.replace("127.0.0.1", "localhost")
    async with Notifier([_hook(url)]) as notifier:
        notifier.notify(_notification())
        assert await notifier.wait(timeout_s=10)
    [result] = notifier.deliveries
    assert not result.ok and result.attempts == 1
    assert result.error is not None and "loopback" in result.error
    assert first.received == []


async def test_the_allow_list_names_a_host_that_may_be_loopback(
    two: tuple[Receiver, Receiver],
) -> None:
    """--allow-webhook-host localhost lets that name through, and only it."""
    first, _ = two
    url = first.url.replace("127.0.0.1", "localhost")
    async with Notifier([_hook(url)], allow_hosts=["LocalHost"]) as notifier:
        notifier.notify(_notification())
        assert await notifier.wait(timeout_s=10)
    assert notifier.deliveries[0].ok and len(first.received) == 1
    async with Notifier([_hook(first.url)], allow_hosts=["localhost"]) as notifier:
        notifier.notify(_notification())
        assert await notifier.wait(timeout_s=10)
    assert not notifier.deliveries[0].ok and len(first.received) == 1


def test_refusal_rules() -> None:
    env = {"KUBERNETES_SERVICE_HOST": "fd00::1"}
    assert refusal("93.184.216.34", environ=env) is None
    assert refusal("10.0.0.7", environ=env) is None  # in-cluster receivers are fine
    assert "API server" in (refusal("fd00::1", environ=env) or "")
    assert "link-local" in (refusal("169.254.0.1", environ=env) or "")
    assert "loopback" in (refusal("127.8.9.10", environ=env) or "")


@pytest.mark.parametrize("url", ["file:///etc/passwd", "gopher://x/", "ftp://h/x", "//h/x"])
def test_only_http_and_https_urls(url: str) -> None:
    with pytest.raises(ValueError, match="http"):
        WebhookConfig(url=url)
