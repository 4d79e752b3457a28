"""Notification formats against local receivers that check what each real service checks.

Each receiver on 127.0.0.1 validates a payload the way its service does (the required fields,
their types and the documented size limits) and answers as the service does: 200 (Slack,
Google Chat), 202 (a Teams workflow), 204 (Discord), or 400 naming the problem. So a delivery
that passes here is one the service would have taken.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pytest
from aiohttp import web
from support.web import on_loopback

from canary.core.records import EndEntry, FailoverEntry, ManualEntry, StartEntry
from canary.kubernetes.spec import SpecError, parse_annotations
from canary.notify.formats import EVENT_KINDS, FORMATS, Notification, payload_for
from canary.notify.webhooks import Notifier, WebhookConfig, parse_webhooks, report_id

ROLLOUT = "shop/app@3f2a1c"
LOOPBACK = ("127.0.0.1",)
BASE = {  # an opted-in Deployment, as tests/kubernetes/test_spec.py has it
    "canary.dev/enabled": "true",
    "canary.dev/router": "ingress-nginx",
    "canary.dev/ingress": "app",
}
LINK = f"http://reports.example/reports/{report_id(ROLLOUT)}"


class Invalid(Exception):
    """What the service would answer 400 for."""


def _require(condition: bool, why: str) -> None:
    if not condition:
        raise Invalid(why)


def _text(value: Any, limit: int, where: str) -> None:
    _require(isinstance(value, str) and value != "", f"{where}: a non-empty string")
    _require(len(value) <= limit, f"{where}: {len(value)} > {limit} characters")


# ---- what each service accepts ---------------------------------------------------------------


def check_slack(body: dict[str, Any]) -> None:
    """Slack incoming webhooks: text (<= 40k) and/or Block Kit blocks (<= 50)."""
    _require("text" in body or "blocks" in body, "no text and no blocks")
    _text(body["text"], 40_000, "text")
    blocks = body.get("blocks", [])
    _require(len(blocks) <= 50, "more than 50 blocks")
    for block in blocks:
        kind = block["type"]
        if kind == "header":
            _require(block["text"]["type"] == "plain_text", "header: plain_text only")
            _text(block["text"]["text"], 150, "header")
        elif kind == "section":
            _require("text" in block or "fields" in block, "section: text or fields")
            if "text" in block:
                _text(block["text"]["text"], 3_000, "section.text")
            fields = block.get("fields", [])
            _require(len(fields) <= 10, "section: more than 10 fields")
            for item in fields:
                _text(item["text"], 2_000, "section.fields[]")
        elif kind == "actions":
            for element in block["elements"]:
                _require(element["type"] == "button", "actions: buttons here")
                _text(element["text"]["text"], 75, "button.text")
                _require(element["url"].startswith("http"), "button.url")
        else:
            raise Invalid(f"unexpected block type {kind}")


def check_teams(body: dict[str, Any]) -> None:
    """Teams incoming webhooks / Workflows: a message with an Adaptive Card attachment."""
    _require(len(json.dumps(body).encode()) <= 28_000, "message over 28 KB")
    _require(body.get("type") == "message", 'type must be "message"')
    attachments = body.get("attachments")
    _require(isinstance(attachments, list) and len(attachments) == 1, "one attachment")
    attachment = attachments[0]
    _require(
        attachment.get("contentType") == "application/vnd.microsoft.card.adaptive",
        "contentType must be an Adaptive Card",
    )
    card = attachment["content"]
    _require(card.get("type") == "AdaptiveCard", "content.type must be AdaptiveCard")
    _require(card.get("version") in ("1.0", "1.2", "1.3", "1.4", "1.5"), "a card version")
    _require(isinstance(card.get("body"), list) and card["body"], "a body")
    for element in card["body"]:
        if element["type"] == "TextBlock":
            _require(isinstance(element["text"], str), "TextBlock.text")
            _require(
                element.get("size", "Default")
                in ("Small", "Default", "Medium", "Large", "ExtraLarge"),
                "size",
            )
            colors = ("Default", "Dark", "Light", "Accent", "Good", "Warning", "Attention")
            _require(element.get("color", "Default") in colors, "color")
            _require(set(element) <= TEXTBLOCK_1_4, f"not in Adaptive Cards 1.4: {set(element)}")
        elif element["type"] == "FactSet":
            for fact in element["facts"]:
                _require(isinstance(fact["title"], str) and isinstance(fact["value"], str), "facts")
        else:
            raise Invalid(f"unexpected element {element['type']}")
    for action in card.get("actions", []):
        _require(action["type"] == "Action.OpenUrl", "actions: OpenUrl")
        _require(action["url"].startswith("http"), "Action.OpenUrl.url")


def check_discord(body: dict[str, Any]) -> None:
    """Discord webhooks: content (<= 2,000) and/or embeds (<= 10, 6,000 characters in all)."""
    _require("content" in body or "embeds" in body, "Cannot send an empty message")
    _text(body["content"], 2_000, "content")
    embeds = body.get("embeds", [])
    _require(len(embeds) <= 10, "more than 10 embeds")
    total = 0
    for embed in embeds:
        _text(embed["title"], 256, "embed.title")
        _text(embed["description"], 4_096, "embed.description")
        _require(isinstance(embed["color"], int) and 0 <= embed["color"] <= 0xFFFFFF, "color")
        datetime.fromisoformat(embed["timestamp"].replace("Z", "+00:00"))
        fields = embed.get("fields", [])
        _require(len(fields) <= 25, "more than 25 fields")
        for item in fields:
            _text(item["name"], 256, "field.name")
            _text(item["value"], 1_024, "field.value")
        total += len(embed["title"]) + len(embed["description"])
        total += sum(len(f["name"]) + len(f["value"]) for f in fields)
        if "url" in embed:
            _require(embed["url"].startswith("http"), "embed.url")
    _require(total <= 6_000, f"embeds hold {total} > 6000 characters")
    _require(body.get("allowed_mentions") == {"parse": []}, "mentions are not parsed")


def check_google_chat(body: dict[str, Any]) -> None:
    """Google Chat incoming webhooks: text (<= 4,096) and/or cardsV2; <= 32,000 bytes."""
    _require(len(json.dumps(body).encode()) <= 32_000, "message over 32,000 bytes")
    _require("text" in body or "cardsV2" in body, "no text and no cards")
    _text(body["text"], 4_096, "text")
    for item in body.get("cardsV2", []):
        _text(item["cardId"], 255, "cardId")
        card = item["card"]
        _text(card["header"]["title"], 200, "header.title")
        for section in card["sections"]:
            for widget in section["widgets"]:
                _require(len(widget) == 1, "one widget kind per widget")
                kind, value = next(iter(widget.items()))
                if kind == "textParagraph":
                    _require(isinstance(value["text"], str), "textParagraph.text")
                elif kind == "decoratedText":
                    _require(isinstance(value["text"], str), "decoratedText.text")
                elif kind == "buttonList":
                    for button in value["buttons"]:
                        _require(button["onClick"]["openLink"]["url"].startswith("http"), "url")
                else:
                    raise Invalid(f"unexpected widget {kind}")


def check_json(body: dict[str, Any]) -> None:
    _require(
        set(body)
        == {
            "source",
            "event",
            "rollout",
            "target",
            "title",
            "text",
            "at",
            "time",
            "fields",
            "report_url",
        },
        f"keys {sorted(body)}",
    )
    _require(body["source"] == "canary", "source")
    datetime.fromisoformat(body["time"].replace("Z", "+00:00"))


# TextBlock's properties in Adaptive Cards 1.4 (the version the card declares).
TEXTBLOCK_1_4 = {
    "type",
    "text",
    "color",
    "fontType",
    "horizontalAlignment",
    "isSubtle",
    "maxLines",
    "size",
    "weight",
    "wrap",
    "id",
    "isVisible",
    "separator",
    "spacing",
    "height",
    "fallback",
}


def check_flagger(body: dict[str, Any]) -> None:
    """What a receiver written for Flagger's webhooks reads (its CanaryWebhookPayload, the
    `event` hook's metadata keys): all strings."""
    _require(
        set(body) == {"name", "namespace", "phase", "checksum", "type", "metadata"},
        f"keys {sorted(body)}",
    )
    _require(all(isinstance(body[k], str) for k in set(body) - {"metadata"}), "a non-string")
    metadata = body["metadata"]
    _require(all(isinstance(v, str) for v in metadata.values()), "metadata: a non-string")
    _require(metadata["eventType"] in ("Normal", "Warning"), metadata["eventType"])
    _require(metadata["timestamp"].isdigit(), f"timestamp {metadata['timestamp']!r}")
    _require(bool(metadata["eventMessage"]), "no eventMessage")
    _require(body["name"] != "" and body["namespace"] != "", "no name or namespace")


CHECKS: dict[str, tuple[Callable[[dict[str, Any]], None], int]] = {
    "slack": (check_slack, 200),
    "teams": (check_teams, 202),
    "discord": (check_discord, 204),
    "google_chat": (check_google_chat, 200),
    "json": (check_json, 200),
    "flagger": (check_flagger, 200),
}


@dataclass
class Services:
    base: str = ""
    received: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)

    def url(self, kind: str) -> str:
        return f"{self.base}/{kind}/T000-secret"


@pytest.fixture
async def services() -> AsyncIterator[Services]:
    found = Services()

    async def handle(request: web.Request) -> web.Response:
        kind = request.match_info["kind"]
        check, status = CHECKS[kind]
        _require_json = request.content_type == "application/json"
        body = await request.json()
        try:
            _require(_require_json, "Content-Type must be application/json")
            check(body)
        except (Invalid, KeyError, TypeError, ValueError, AttributeError) as exc:
            found.refused.append(f"{kind}: {exc!r}")
            return web.Response(status=400, text=f"invalid payload: {exc}")
        found.received.setdefault(kind, []).append(body)
        if status == 204:
            return web.Response(status=204)
        return web.Response(status=status, text="ok")

    app = web.Application()
    app.router.add_post("/{kind}/{secret}", handle)
    async with on_loopback(app) as found.base:
        yield found


def _hooks(services: Services) -> list[WebhookConfig]:
    return [
        WebhookConfig(
            url=services.url(kind),
            format=kind,  # type: ignore[arg-type]
            backoff_s=0.01,
            max_attempts=2,
            report_base_url="http://reports.example",
        )
        for kind in FORMATS
    ]


def _entries(reason: str) -> list[Any]:
    return [
        StartEntry(at=100.0, rollout=ROLLOUT, target="shop/app", steps=[10, 50]),
        ManualEntry(at=110.0, rollout=ROLLOUT, command="pause", who="alice", reason="look first"),
        FailoverEntry(
            at=120.0,
            rollout=ROLLOUT,
            direction="to-standby",
            who="controller",
            reason="primary unhealthy",
            forced=False,
        ),
        EndEntry(at=160.0, rollout=ROLLOUT, outcome="rolled_back", reason=reason, duration_s=60.0),
    ]


async def test_every_format_is_taken_by_its_service(services: Services) -> None:
    """One notifier, five webhooks each in its own format: every service accepts every
    event (manual, failover, rollback), and each payload carries the title, the why and
    the report link where that service shows them."""
    async with Notifier(_hooks(services), allow_hosts=LOOPBACK) as notifier:
        for entry in _entries("errors: canary/primary 3.1, lower bound 1.8 > 1.2"):
            notifier.on_entry(entry)
        assert await notifier.wait(timeout_s=20)
    assert services.refused == []
    assert all(d.ok for d in notifier.deliveries), notifier.deliveries
    assert {kind: len(got) for kind, got in services.received.items()} == dict.fromkeys(FORMATS, 3)

    slack = services.received["slack"][-1]
    assert "shop/app: rolled back" in slack["text"] and LINK in slack["text"]
    teams = services.received["teams"][-1]["attachments"][0]["content"]
    assert "shop/app: rolled back" in teams["body"][0]["text"]
    assert teams["body"][1]["text"] == "errors: canary/primary 3.1, lower bound 1.8 > 1.2"
    assert {"title": "Rollout", "value": ROLLOUT} in teams["body"][2]["facts"]
    assert teams["actions"] == [{"type": "Action.OpenUrl", "title": "Open the report", "url": LINK}]
    discord = services.received["discord"][-1]
    assert discord["embeds"][0]["url"] == LINK
    assert discord["embeds"][0]["timestamp"] == "1970-01-01T00:02:40Z"
    chat = services.received["google_chat"][-1]
    buttons = chat["cardsV2"][0]["card"]["sections"][0]["widgets"][-1]["buttonList"]["buttons"]
    assert buttons[0]["onClick"]["openLink"]["url"] == LINK
    plain = services.received["json"]
    assert [p["event"] for p in plain] == ["manual", "failover", "rolled_back"]
    assert plain[-1] == {
        "source": "canary",
        "event": "rolled_back",
        "rollout": ROLLOUT,
        "target": "shop/app",
        "title": "shop/app: rolled back",
        "text": "errors: canary/primary 3.1, lower bound 1.8 > 1.2",
        "at": 160.0,
        "time": "1970-01-01T00:02:40Z",
        "fields": {"Outcome": "rolled back", "Duration": "60s"},
        "report_url": LINK,
    }


async def test_a_huge_reason_is_cut_to_each_services_limits(services: Services) -> None:
    """A 100,000-character reason (with markup and a mass mention) still goes out in every
    format, cut to each service's limits, and pings nobody on Discord."""
    reason = "@everyone <b>&</b> " + "x" * 100_000
    async with Notifier(_hooks(services), allow_hosts=LOOPBACK) as notifier:
        for entry in _entries(reason):
            if isinstance(entry, StartEntry | EndEntry):
                notifier.on_entry(entry)
        assert await notifier.wait(timeout_s=20)
    assert services.refused == []
    assert all(d.ok for d in notifier.deliveries), notifier.deliveries
    assert len(services.received["discord"][0]["content"]) <= 2_000
    assert services.received["discord"][0]["content"].endswith(f" Report: {LINK}")
    assert len(services.received["slack"][0]["text"]) <= 40_000
    assert services.received["json"][0]["text"] == reason  # the plain event is not cut


def test_every_format_checks_offline_for_every_event() -> None:
    """The payload builders alone, for every event kind, with and without a link."""
    for event in EVENT_KINDS:
        notification = Notification(
            event=event,  # type: ignore[arg-type]
            rollout=ROLLOUT,
            target="shop/app",
            title=f"shop/app: {event}",
            text="why",
            at=0.0,
            fields={"By": "alice"},
        )
        for kind, (check, _) in CHECKS.items():
            for link in (LINK, None):
                check(payload_for(kind, notification, link=link))  # type: ignore[arg-type]


def test_format_is_chosen_per_webhook_in_config_and_annotations() -> None:
    hooks = parse_webhooks(
        [
            {"url": "https://hooks.slack.example/T/B/X"},
            {"url": "https://example.webhook.office.com/x", "format": "teams"},
            {"url": "https://discord.example/api/webhooks/1/x", "format": "Discord"},
            {"url": "https://chat.googleapis.example/v1/spaces/x", "format": "google-chat"},
        ]
    )
    assert [h.format for h in hooks] == ["slack", "teams", "discord", "google_chat"]
    with pytest.raises(ValueError, match=r"webhooks\[0\].format: .*must be one of slack, teams"):
        parse_webhooks([{"url": "https://x.example/", "format": "msn"}])

    spec = parse_annotations(
        {
            **BASE,
            "canary.dev/webhook.post-rollout": "https://example.webhook.office.com/x",
            "canary.dev/webhook.post-rollout.format": "teams",
            "canary.dev/webhook.rolled-back": "https://discord.example/api/webhooks/1/x",
        }
    )
    assert {h.type: h.format for h in spec.webhooks} == {
        "post-rollout": "teams",
        "rolled-back": "slack",
    }
    with pytest.raises(SpecError) as caught:
        parse_annotations(
            {
                **BASE,
                "canary.dev/webhook.rolled-back.format": "discord",
                "canary.dev/webhook.post-rollout": "https://x.example/",
                "canary.dev/webhook.post-rollout.format": "fax",
            }
        )
    assert caught.value.problems == {
        "canary.dev/webhook.rolled-back.format": "no canary.dev/webhook.rolled-back to format",
        "canary.dev/webhook.post-rollout.format": (
            "must be one of slack, teams, discord, google_chat, json, flagger, got 'fax'"
        ),
    }


async def test_every_format_keeps_the_address_guard(services: Services) -> None:
    """The format changes the body only: without the allow-list a loopback receiver is
    refused without a connection, in every format, and nothing arrives."""
    async with Notifier(_hooks(services)) as notifier:  # no allow_hosts
        for entry in _entries("why"):
            notifier.on_entry(entry)
        assert await notifier.wait(timeout_s=20)
    assert services.received == {}
    assert len(notifier.deliveries) == 3 * len(FORMATS)
    for delivery in notifier.deliveries:
        assert not delivery.ok and delivery.attempts == 1 and delivery.status is None
        assert delivery.error is not None and "loopback" in delivery.error
        assert "T000-secret" not in delivery.url


def test_an_event_goes_out_in_flaggers_event_payload() -> None:
    """A Kubernetes Event, as the operator tells `webhook.event` of it, in Flagger's event
    webhook payload: the app's name and namespace, the rollout's phase and revision, and the
    Event's message, type and time (milliseconds) in `metadata`; an outcome told in this
    format says Succeeded or Failed as Flagger's phases do."""
    event = Notification(
        event="event",
        rollout=ROLLOUT,
        target="shop/app",
        title="shop/app: Progressing",
        text="step 1/3: weight 30",
        at=1764741234.567,
        fields={
            "name": "app",
            "namespace": "shop",
            "phase": "Progressing",
            "checksum": "3f2a1c",
            "type": "Normal",
            "reason": "Progressing",
        },
    )
    assert payload_for("flagger", event, link=LINK) == {
        "name": "app",
        "namespace": "shop",
        "phase": "Progressing",
        "checksum": "3f2a1c",
        "type": "event",
        "metadata": {
            "eventMessage": "step 1/3: weight 30",
            "eventType": "Normal",
            "timestamp": "1764741234567",
            "eventReason": "Progressing",
            "report": LINK,
        },
    }
    rolled_back = Notification(
        event="rolled_back", rollout=ROLLOUT, target="shop/app", title="t", text="why", at=1.0
    )
    body = payload_for("flagger", rolled_back, link=None)
    assert (body["name"], body["namespace"], body["phase"]) == ("app", "shop", "Failed")
    assert body["type"] == "rolled_back"
    assert body["metadata"] == {"eventMessage": "why", "eventType": "Warning", "timestamp": "1000"}


def test_the_event_webhook_annotation_defaults_to_flaggers_payload() -> None:
    """`canary.dev/webhook.event` is a notification webhook told of Events only, in Flagger's
    payload unless its `.format` names another; a webhook in a config file that names no
    events is not told of Events (they would flood a chat channel)."""
    spec = parse_annotations({**BASE, "canary.dev/webhook.event": "https://events.example/in"})
    assert [(w.type, w.format) for w in spec.webhooks] == [("event", "flagger")]
    spec = parse_annotations(
        {
            **BASE,
            "canary.dev/webhook.event": "https://hooks.slack.example/T/B/X",
            "canary.dev/webhook.event.format": "slack",
        }
    )
    assert [(w.type, w.format) for w in spec.webhooks] == [("event", "slack")]
    assert "event" not in parse_webhooks(["https://x.example/"])[0].events
    with pytest.raises(
        ValueError, match=r"webhooks\[0\]\.events: `event`.*canary\.dev/webhook\.event"
    ):
        parse_webhooks([{"url": "https://x.example/", "events": ["promoted", "event"]}])


def test_a_webhooks_metadata_goes_where_its_format_has_room_and_nowhere_else() -> None:
    """A notification webhook's own `metadata` (a config file's, an annotation's `.metadata`)
    is added to Flagger's payload in the keys the event leaves free (Flagger's rule: the
    event's win) and to the json payload as "metadata"; a chat format has no place for it,
    so it is refused by name rather than dropped, in a config file and in annotations."""
    event = Notification(
        event="event", rollout=ROLLOUT, target="shop/app", title="t", text="why", at=2.0
    )
    mine = {"team": "payments", "eventMessage": "not this", "report": "not this either"}
    body = payload_for("flagger", event, link=LINK, metadata=mine)
    assert body["metadata"] == {
        "eventMessage": "why",
        "eventType": "Normal",
        "timestamp": "2000",
        "report": LINK,
        "team": "payments",
    }
    assert payload_for("json", event, link=None, metadata=mine)["metadata"] == mine
    assert "metadata" not in payload_for("json", event, link=None)
    assert payload_for("slack", event, link=None, metadata=mine) == payload_for(
        "slack", event, link=None
    )
    hook = WebhookConfig(url="https://x.example/", format="flagger", metadata='{"a": "b"}')
    assert hook.metadata == {"a": "b"}
    with pytest.raises(ValueError, match=r"metadata is sent only in the flagger and json"):
        WebhookConfig(url="https://x.example/", metadata={"a": "b"})  # slack, the default
    with pytest.raises(ValueError, match=r"values must be strings"):
        WebhookConfig(url="https://x.example/", format="json", metadata={"rps": 5})

    spec = parse_annotations(
        {
            **BASE,
            "canary.dev/webhook.post-rollout": "https://x.example/done",
            "canary.dev/webhook.post-rollout.format": "json",
            "canary.dev/webhook.post-rollout.metadata": '{"team": "payments"}',
            "canary.dev/webhook.post-rollout.timeout": "2s",
        }
    )
    (done,) = spec.webhooks
    assert (done.metadata, done.timeout_s) == ({"team": "payments"}, 2.0)
    # a gate's metadata is Flagger's payload's, whatever the notifications' formats
    spec = parse_annotations(
        {
            **BASE,
            "canary.dev/webhook.rollout": "http://loadtest.example/",
            "canary.dev/webhook.rollout.metadata": '{"rps": "5"}',
            "canary.dev/webhook.pre-rollout": "http://check.example/",
            "canary.dev/webhook.pre-rollout.metadata": '{"team": "payments"}',
        }
    )
    assert sorted(
        (w.type, w.metadata["rps" if w.type == "rollout" else "team"]) for w in spec.webhooks
    ) == [
        ("pre-rollout", "payments"),
        ("rollout", "5"),
    ]
    with pytest.raises(SpecError) as refused:
        parse_annotations(
            {
                **BASE,
                "canary.dev/webhook.rolled-back": "https://hooks.slack.example/T/B/X",
                "canary.dev/webhook.rolled-back.metadata": '{"team": "payments"}',
                "canary.dev/webhook.event": "https://x.example/events",
                "canary.dev/webhook.event.retries": "3",
            }
        )
    assert refused.value.problems == {
        "canary.dev/webhook.rolled-back.metadata": "is sent only in the flagger and json "
        "formats; canary.dev/webhook.rolled-back posts slack (see its .format)",
        "canary.dev/webhook.event.retries": "only gates take .retries: canary tries a "
        "notification up to 4 times itself, and the rollout never waits for it",
    }


async def test_webhooks_changed_mid_rollout_lose_and_misname_nothing(services: Services) -> None:
    """The operator swaps a notifier's webhooks in place when the annotations change: a
    delivery in flight to the old webhook goes on, and the rollout's target (learned from
    its start) still names the outcome sent to the new one. Event posts in flight are
    counted apart (the operator's cap on them)."""
    old, new = (
        WebhookConfig(url=services.url("json"), format="json", backoff_s=0.01),
        WebhookConfig(url=services.url("flagger"), format="flagger", backoff_s=0.01),
    )
    start, manual, _, end = _entries("why")
    async with Notifier([old], allow_hosts=LOOPBACK) as notifier:
        notifier.on_entry(start)
        assert notifier.on_entry(manual) == 1
        notifier.use([new])
        assert notifier.webhooks == (new,) and notifier.pending_of("event") == 0
        assert notifier.on_entry(end) == 1
        assert await notifier.wait(timeout_s=20)
        assert notifier.pending_of("manual") == notifier.pending_of("rolled_back") == 0
    assert all(d.ok for d in notifier.deliveries), notifier.deliveries
    assert [p["event"] for p in services.received["json"]] == ["manual"]
    (told,) = services.received["flagger"]
    assert (told["name"], told["namespace"], told["type"]) == ("app", "shop", "rolled_back")
    # a resumed rollout's record has no start to learn the target from: the caller says it
    async with Notifier([new], allow_hosts=LOOPBACK) as resumed:
        resumed.on_entry(end, target="shop/app")
        assert await resumed.wait(timeout_s=20)
    assert services.received["flagger"][-1]["name"] == "app"
