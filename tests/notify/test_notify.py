"""Webhook notifications against a real aiohttp receiver on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import ValidationError
from support.web import Receiver, receiving

from canary.core.records import EndEntry, FailoverEntry, ManualEntry, StartEntry, TickEntry
from canary.notify.webhooks import (
    Notification,
    Notifier,
    NotifierError,
    WebhookConfig,
    parse_webhooks,
    report_id,
    slack_payload,
)

ROLLOUT = "demo/app@3f2a1c"
LOOPBACK = ("127.0.0.1",)  # the receivers here are on loopback, which is refused by default


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with receiving() as rec:
        yield rec


def _hook(url: str, **options: Any) -> WebhookConfig:
    options.setdefault("backoff_s", 0.01)
    options.setdefault("report_base_url", "http://127.0.0.1:9/")
    return WebhookConfig(url=url, **options)


def _start() -> StartEntry:
    return StartEntry(at=100.0, rollout=ROLLOUT, target="demo/app", steps=[10, 50])


def _end(outcome: str = "rolled_back") -> EndEntry:
    return EndEntry(
        at=160.0,
        rollout=ROLLOUT,
        outcome=outcome,  # type: ignore[arg-type]
        reason="errors: canary/primary 3.1, lower bound 1.8 > 1.2",
        duration_s=60.0,
    )


def _notification(event: str = "promoted") -> Notification:
    return Notification(
        event=event,  # type: ignore[arg-type]
        rollout=ROLLOUT,
        target="demo/app",
        title="demo/app: promoted",
        text="analysis passed <at> the last step & all is well",
        at=1.0,
    )


# --- payload -----------------------------------------------------------------------------


async def test_rollback_payload_is_slack_shaped_with_report_link(receiver: Receiver) -> None:
    """A rollback posts Slack JSON with text, blocks and a button to the rollout's report."""
    async with Notifier(allow_hosts=LOOPBACK, webhooks=[_hook(receiver.url)]) as notifier:
        notifier.on_entry(_start())
        assert notifier.on_entry(_end()) == 1
        assert await notifier.wait(timeout_s=10)
    [payload] = receiver.received
    assert set(payload) == {"text", "blocks"}
    assert "demo/app: rolled back" in payload["text"]
    assert "lower bound 1.8" in payload["text"]
    link = f"http://127.0.0.1:9/reports/{report_id(ROLLOUT)}"
    assert payload["text"].endswith(link)
    types = [block["type"] for block in payload["blocks"]]
    assert types == ["header", "section", "section", "actions"]
    assert payload["blocks"][0]["text"] == {"type": "plain_text", "text": "demo/app: rolled back"}
    assert payload["blocks"][3]["elements"][0]["url"] == link
    fields = [f["text"] for f in payload["blocks"][2]["fields"]]
    assert f"*Rollout*\n`{ROLLOUT}`" in fields
    assert "*Outcome*\nrolled back" in fields
    [result] = notifier.deliveries
    assert result.ok and result.attempts == 1 and result.status == 200
    # the secret path of the webhook URL stays out of results and logs
    assert "secret" not in result.url


def test_payload_escapes_slack_control_characters() -> None:
    """Text with <, > and & is escaped for mrkdwn so it cannot forge links or mentions."""
    payload = slack_payload(_notification(), link=None)
    section = payload["blocks"][1]["text"]["text"]
    assert "&lt;at&gt;" in section and "&amp;" in section
    assert all(block["type"] != "actions" for block in payload["blocks"])


def test_report_id_is_url_and_file_safe() -> None:
    """Rollout ids with slashes and @ map to a stable, path-safe report id."""
    assert report_id("demo/app@3f2a1c") == "demo_app_3f2a1c"
    assert report_id("../../etc/passwd") == "etc_passwd"
    assert report_id("///") == "rollout"


async def test_manual_and_failover_entries_notify_with_the_target(receiver: Receiver) -> None:
    """Manual actions and failovers notify, titled with the target from the start entry;
    ticks do not."""
    async with Notifier(allow_hosts=LOOPBACK, webhooks=[_hook(receiver.url)]) as notifier:
        notifier.on_entry(_start())
        tick = TickEntry(
            at=101.0,
            rollout=ROLLOUT,
            elapsed_s=1.0,
            phase="progressing",
            step=0,
            weight_set=10,
            weight_read=10,
            primary=None,
            canary=None,
        )
        assert notifier.on_entry(tick) == 0
        notifier.on_entry(
            ManualEntry(at=102.0, rollout=ROLLOUT, command="pause", who="alice", reason="look")
        )
        notifier.on_entry(
            FailoverEntry(
                at=103.0,
                rollout=ROLLOUT,
                direction="to-standby",
                who="controller",
                reason="primary cluster down",
            )
        )
        assert await notifier.wait(timeout_s=10)
    titles = sorted(p["blocks"][0]["text"]["text"] for p in receiver.received)
    assert titles == ["demo/app: alice ran pause", "demo/app: failover to-standby"]


async def test_webhook_gets_only_subscribed_events(receiver: Receiver) -> None:
    """A webhook subscribed to failovers only is not called for a promotion."""
    async with Notifier(
        allow_hosts=LOOPBACK, webhooks=[_hook(receiver.url, events=["failover"])]
    ) as notifier:
        notifier.on_entry(_start())
        assert notifier.on_entry(_end("promoted")) == 0
        assert notifier.notify(_notification("failover")) == 1
        assert await notifier.wait(timeout_s=10)
    assert len(receiver.received) == 1


async def test_superseded_rollout_is_not_notified(receiver: Receiver) -> None:
    """A rollout superseded by a newer version ends quietly."""
    async with Notifier(allow_hosts=LOOPBACK, webhooks=[_hook(receiver.url)]) as notifier:
        assert notifier.on_entry(_end("superseded")) == 0


# --- retries -----------------------------------------------------------------------------


async def test_retries_on_500_then_succeeds(receiver: Receiver) -> None:
    """Two 500s then a 200: delivered on the third attempt, the same payload each time."""
    receiver.statuses = [500, 503]
    async with Notifier(
        allow_hosts=LOOPBACK, webhooks=[_hook(receiver.url, max_attempts=4)]
    ) as notifier:
        notifier.notify(_notification())
        assert await notifier.wait(timeout_s=10)
    [result] = notifier.deliveries
    assert result.ok and result.attempts == 3 and result.status == 200
    assert len(receiver.received) == 3
    assert receiver.received[0] == receiver.received[2]


async def test_retries_are_bounded(receiver: Receiver) -> None:
    """A receiver that always fails gets exactly max_attempts posts; the failure is data."""
    receiver.statuses = [500] * 10
    async with Notifier(
        allow_hosts=LOOPBACK, webhooks=[_hook(receiver.url, max_attempts=3)]
    ) as notifier:
        notifier.notify(_notification())
        assert await notifier.wait(timeout_s=10)
    [result] = notifier.deliveries
    assert not result.ok and result.attempts == 3
    assert result.status == 500 and result.error == "HTTP 500: nope"
    assert len(receiver.received) == 3


async def test_retry_after_is_honoured_and_capped(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 429's Retry-After sets the wait before the next post (not the 0.01 s backoff), and a
    Retry-After of an hour waits only the 30 s cap. Waits are recorded here, not slept."""
    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float) -> None:
        waits.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    receiver.statuses = [429, 503]
    receiver.retry_after = ["2", "3600"]
    async with Notifier(
        allow_hosts=LOOPBACK, webhooks=[_hook(receiver.url, max_attempts=3)]
    ) as notifier:
        notifier.notify(_notification())
        assert await notifier.wait(timeout_s=10)
    [result] = notifier.deliveries
    assert result.ok and result.attempts == 3
    first, second = [w for w in waits if w > 0.1]
    assert 2.0 <= first <= 2.5 and second == 30.0  # 2 s spread by up to a quarter; the cap


async def test_client_error_is_not_retried(receiver: Receiver) -> None:
    """A 404 means the webhook is wrong; posting again would not help."""
    receiver.statuses = [404]
    async with Notifier(
        allow_hosts=LOOPBACK, webhooks=[_hook(receiver.url, max_attempts=5)]
    ) as notifier:
        notifier.notify(_notification())
        assert await notifier.wait(timeout_s=10)
    assert notifier.deliveries[0].attempts == 1
    assert len(receiver.received) == 1


async def test_unreachable_webhook_is_retried_then_reported() -> None:
    """Connection refused on a closed loopback port: bounded retries, an error, no raise."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with Notifier(
        allow_hosts=LOOPBACK, webhooks=[_hook(f"http://127.0.0.1:{port}/hook", max_attempts=2)]
    ) as notifier:
        notifier.notify(_notification())
        assert await notifier.wait(timeout_s=10)
    [result] = notifier.deliveries
    assert not result.ok and result.attempts == 2 and result.status is None
    assert result.error is not None and "Connect" in result.error


async def test_slow_webhook_times_out_per_attempt(receiver: Receiver) -> None:
    """A receiver that never answers costs each attempt its timeout, then gives up."""
    receiver.hang = asyncio.Event()
    hook = _hook(receiver.url, timeout_s=0.2, max_attempts=2)
    async with Notifier(allow_hosts=LOOPBACK, webhooks=[hook]) as notifier:
        notifier.notify(_notification())
        assert await notifier.wait(timeout_s=10)
    [result] = notifier.deliveries
    assert not result.ok and result.attempts == 2
    assert result.error == "no answer within 0.2s"


# --- never blocks ------------------------------------------------------------------------


async def test_notify_returns_before_the_webhook_is_called(receiver: Receiver) -> None:
    """notify() only schedules: it returns before the receiver has seen anything, and the
    caller's loop keeps running while the receiver hangs."""
    receiver.hang = asyncio.Event()
    notifier = Notifier(allow_hosts=LOOPBACK, webhooks=[_hook(receiver.url, timeout_s=60)])
    try:
        assert notifier.notify(_notification()) == 1
        assert receiver.received == [] and notifier.pending == 1
        await receiver.arrived.wait()  # the delivery is in flight, hanging
        ticks = 0
        for _ in range(5):  # the rollout's own work goes on
            await asyncio.sleep(0)
            ticks += 1
        assert ticks == 5 and notifier.pending == 1 and notifier.deliveries == []
    finally:
        await notifier.aclose()
    assert notifier.pending == 0


async def test_aclose_cancels_and_awaits_in_flight_deliveries(receiver: Receiver) -> None:
    """Shutdown cancels a hanging delivery and awaits it; nothing is left running."""
    receiver.hang = asyncio.Event()
    notifier = Notifier(allow_hosts=LOOPBACK, webhooks=[_hook(receiver.url, timeout_s=60)])
    notifier.notify(_notification())
    await receiver.arrived.wait()
    tasks = set(notifier._tasks)
    await notifier.aclose(grace_s=0.05)
    assert notifier.pending == 0 and all(task.done() for task in tasks)
    assert notifier.deliveries == []
    with pytest.raises(NotifierError, match="after aclose"):
        notifier.notify(_notification())


def test_notify_outside_an_event_loop_is_a_clear_error() -> None:
    """Scheduling needs a running loop; without one the error says so."""
    with pytest.raises(NotifierError, match="running event loop"):
        Notifier(allow_hosts=LOOPBACK, webhooks=[WebhookConfig(url="http://127.0.0.1:9/")]).notify(
            _notification()
        )


# --- config ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"url": "ftp://example/hook"}, "url must be an absolute http"),
        ({"url": "/hook"}, "url must be an absolute http"),
        ({"url": "http://127.0.0.1/", "report_base_url": "reports"}, "report_base_url must be"),
        ({"url": "http://127.0.0.1/", "events": ["promoted", "exploded"]}, "unknown event"),
        ({"url": "http://127.0.0.1/", "events": []}, "events is empty"),
        ({"url": "http://127.0.0.1/", "max_attempts": 0}, "max_attempts"),
        ({"url": "http://127.0.0.1/", "timeout_s": 0}, "timeout_s"),
        ({"url": "http://127.0.0.1/", "retries": 3}, "retries"),
    ],
)
def test_bad_webhook_config_names_the_field(options: dict[str, Any], message: str) -> None:
    """Invalid webhook settings fail validation with the offending field named."""
    with pytest.raises(ValidationError, match=message):
        WebhookConfig(**options)


def test_webhook_config_defaults_to_every_event() -> None:
    """Without `events`, a webhook hears about promotions, rollbacks, failovers and manual
    actions."""
    hook = WebhookConfig(url="https://hooks.example/T/B/x")
    assert hook.events == {"promoted", "rolled_back", "failover", "manual"}


def test_webhooks_parse_from_annotation_text() -> None:
    """An annotation may hold one URL, a comma-separated list, or JSON webhook objects."""
    assert [h.url for h in parse_webhooks("http://127.0.0.1:9/a, http://127.0.0.1:9/b")] == [
        "http://127.0.0.1:9/a",
        "http://127.0.0.1:9/b",
    ]
    [hook] = parse_webhooks('[{"url": "https://hooks.example/x", "events": ["failover"]}]')
    assert hook.events == {"failover"}
    assert parse_webhooks({"url": "http://127.0.0.1:9/"})[0].max_attempts == 4


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[{bad", "canary.io/webhooks: not valid JSON"),
        ('[{"url": "http://127.0.0.1/", "events": ["boom"]}]', r"canary.io/webhooks\[0\].events"),
        ("http://127.0.0.1/, ftp://x/", r"canary.io/webhooks\[1\].url: .*absolute http"),
        ("[42]", r"canary.io/webhooks\[0\]: "),
        (42, "expected a URL or a list of webhooks"),
    ],
)
def test_bad_webhook_annotations_name_the_item(value: object, message: str) -> None:
    """Bad webhook settings say which annotation, which item and which field."""
    with pytest.raises(ValueError, match=message):
        parse_webhooks(value, source="canary.io/webhooks")


def test_static_target_config_embeds_webhooks() -> None:
    """A target config's `webhooks` are WebhookConfig values; a bad one names its path."""
    from canary.static.config import ConfigError, parse_config

    base = {
        "name": "checkout",
        "router": {"kind": "haproxy", "socket": "/tmp/h.sock", "backend": "checkout"},
        "metrics": {"kind": "prometheus", "url": "http://127.0.0.1:9090"},
    }
    config = parse_config(
        {**base, "webhooks": [{"url": "https://hooks.example/x", "events": ["rolled_back"]}]}
    )
    assert [(h.url, set(h.events)) for h in config.webhooks] == [
        ("https://hooks.example/x", {"rolled_back"})
    ]
    assert parse_config(base).webhooks == []
    with pytest.raises(ConfigError, match=r"webhooks\[0\]\.url|webhooks\.0\.url"):
        parse_config({**base, "webhooks": [{"url": "hooks.example"}]})
