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
