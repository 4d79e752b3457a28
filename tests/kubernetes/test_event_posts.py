"""A Deployment's `canary.dev/webhook.event` against a receiver on 127.0.0.1 that stops
answering: at most 64 Event posts are in flight per Deployment, the Events past them are
counted and said once in the log (not queued without bound), and posting resumes, with the
count said, once the receiver answers again."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace

import pytest
from support.waiting import eventually
from support.web import Receiver, receiving

from canary.kubernetes import operator
from canary.kubernetes.operator import DeploymentWorker
from canary.notify.webhooks import Notifier, WebhookConfig

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with receiving() as rec:
        rec.hang = asyncio.Event()
        yield rec


async def test_event_posts_in_flight_are_capped_and_the_rest_counted(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    cap = operator._MAX_EVENT_POSTS
    hook = WebhookConfig(
        url=receiver.url,
        events=frozenset({"event"}),
        format="flagger",
        timeout_s=60,
        max_attempts=1,
    )
    # The worker's Event path needs its name, its notifier and the operator's clock alone.
    worker = DeploymentWorker(SimpleNamespace(clock=time.time), ("shop", "app"))  # type: ignore[arg-type]
    async with Notifier([hook], allow_hosts=("127.0.0.1",)) as notifier:
        worker.notifier = notifier
        caplog.set_level(logging.WARNING, logger=operator.log.name)
        for i in range(cap + 6):
            worker._post_event("Normal", "Progressing", f"step {i}")
        assert notifier.pending_of("event") == cap
        assert worker._event_posts_dropped == 6
        held = [r.getMessage() for r in caplog.records if "in flight" in r.getMessage()]
        assert held == [
            f"shop/app: {cap} Event posts in flight (webhook.event does not "
            "answer); Events are not posted until they end"
        ], held
        await eventually(lambda: len(receiver.received) == cap, "the posts in flight to arrive")

        receiver.hang.set()
        await eventually(lambda: notifier.pending_of("event") == 0, "the posts to end")
        worker._post_event("Warning", "Halted", "after the receiver answered")
        assert worker._event_posts_dropped == 0
        again = [r.getMessage() for r in caplog.records if "posted again" in r.getMessage()]
        assert again == [
            "shop/app: Events are posted again; 6 were not (webhook.event was not answering)"
        ], again
        await eventually(lambda: len(receiver.received) == cap + 1, "the post after the pause")
    messages = [p["metadata"]["eventMessage"] for p in receiver.received]
    assert sorted(messages[:cap]) == sorted(f"step {i}" for i in range(cap))
    assert messages[cap] == "after the receiver answered"
    assert receiver.received[cap]["metadata"]["eventType"] == "Warning"


async def test_the_event_webhooks_timeout_and_metadata_come_from_its_annotations(
    receiver: Receiver,
) -> None:
    """`webhook.event.metadata` is added to Flagger's event payload where the Event's own keys
    leave room (as Flagger adds it), and `webhook.event.timeout` bounds each attempt: a
    receiver that does not answer within it is a failed delivery that says so."""
    from canary.kubernetes.spec import parse_annotations

    spec = parse_annotations(
        {
            "canary.dev/enabled": "true",
            "canary.dev/router": "ingress-nginx",
            "canary.dev/ingress": "app",
            "canary.dev/webhook.event": receiver.url,
            "canary.dev/webhook.event.timeout": "1s",
            "canary.dev/webhook.event.metadata": '{"team": "payments", "eventType": "mine"}',
        }
    )
    settings = SimpleNamespace(allow_webhook_hosts=("127.0.0.1",))
    op = SimpleNamespace(clock=time.time, settings=settings)
    worker = DeploymentWorker(op, ("shop", "app"))  # type: ignore[arg-type]
    notifier = await worker._notifier(spec)
    assert notifier is not None
    try:
        (hook,) = notifier.webhooks
        assert (hook.timeout_s, hook.format) == (1.0, "flagger")
        receiver.hang.set()
        worker._post_event("Warning", "Halted", "the canary failed its analysis")
        await eventually(lambda: len(receiver.received) == 1, "the Event's post")
        metadata = receiver.received[0]["metadata"]
        assert metadata["team"] == "payments"
        assert (metadata["eventType"], metadata["eventMessage"]) == (
            "Warning",
            "the canary failed its analysis",
        )
        await eventually(lambda: notifier.pending_of("event") == 0, "the post to end")

        receiver.hang.clear()  # the receiver stops answering: each attempt ends at 1 s
        began = time.monotonic()
        worker._post_event("Normal", "Progressing", "step 2")
        await eventually(lambda: notifier.pending_of("event") == 0, "the post to give up", 40)
        failed = notifier.deliveries[-1]
        assert not failed.ok and failed.error is not None and "within 1.0s" in failed.error
        # its attempts and the backoff between them: not the default 5 s an attempt
        assert time.monotonic() - began < 5.0 * hook.max_attempts
    finally:
        await notifier.aclose(grace_s=0)
