"""Notification payloads: one notification, in the shape each chat service's webhook expects.

A webhook's `format` chooses one (`WebhookConfig.format`, the default `slack`):

    slack        {"text", "blocks"}: Slack incoming webhooks (and the many tools that accept
                 Slack's shape). text <= 40,000 characters, header <= 150, a section's text
                 <= 3,000, at most 10 fields of <= 2,000 each.
    teams        {"type": "message", "attachments": [an Adaptive Card 1.4]}: Microsoft Teams
                 incoming webhooks and Workflows ("Post to a channel when a webhook request is
                 received"); a message stays under Teams' 28 KB.
    discord      {"content", "embeds", "allowed_mentions"}: Discord webhooks. content <= 2,000
                 characters, one embed (title <= 256, description <= 4,096, <= 25 fields of
                 name <= 256 / value <= 1,024, all text <= 6,000); mentions are never parsed,
                 so a reason saying "@everyone" pings nobody.
    google_chat  {"text", "cardsV2"}: Google Chat incoming webhooks; text <= 4,096 characters
                 (a message is at most 32,000 bytes).
    json         the event itself: {"source", "event", "rollout", "target", "title", "text",
                 "at", "time", "fields", "report_url"}, for incident tools and your own code
                 (and "metadata", the webhook's own, when it has one).
    flagger      Flagger's webhook payload {"name", "namespace", "phase", "checksum", "type",
                 "metadata": {"eventMessage", "eventType", "timestamp", ...}}: what receivers
                 written for Flagger's `event` webhook read (the default of
                 `canary.dev/webhook.event`); the webhook's own metadata is added where the
                 event's keys leave room, as Flagger adds it.

Pure: builds dictionaries, sends nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "EVENT_KINDS",
    "FORMATS",
    "METADATA_FORMATS",
    "METADATA_RULE",
    "NOTIFY_KINDS",
    "EventKind",
    "Format",
    "Notification",
    "discord_payload",
    "flagger_payload",
    "google_chat_payload",
    "json_payload",
    "payload_for",
    "slack_payload",
    "teams_payload",
]

# `event`: a Kubernetes Event the controller recorded for the app (Flagger's `event`
# webhook), told only to webhooks that ask for it.
EventKind = Literal["promoted", "rolled_back", "failover", "manual", "event"]
EVENT_KINDS: tuple[EventKind, ...] = ("promoted", "rolled_back", "failover", "manual", "event")
# What a webhook that names no events is told of: outcomes and manual actions, not every Event.
NOTIFY_KINDS: tuple[EventKind, ...] = ("promoted", "rolled_back", "failover", "manual")

Format = Literal["slack", "teams", "discord", "google_chat", "json", "flagger"]
FORMATS: tuple[Format, ...] = ("slack", "teams", "discord", "google_chat", "json", "flagger")
# The formats whose payload has a place for a webhook's own `metadata`.
METADATA_FORMATS: tuple[Format, ...] = ("flagger", "json")
# Why a webhook in another format is refused its metadata (its config's and its annotation's).
METADATA_RULE = f"is sent only in the {' and '.join(METADATA_FORMATS)} formats"


class Notification(BaseModel):
    """Something worth telling people about."""

    model_config = ConfigDict(frozen=True)

    event: EventKind
    rollout: str
    target: str
    title: str  # one line: "demo/app: rolled back"
    text: str  # the why, one or two sentences
    at: float  # unix seconds
    fields: dict[str, str] = Field(default_factory=dict)


def _cut(text: str, limit: int) -> str:
    """At most `limit` characters, an ellipsis marking a cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _iso(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


# ---- Slack ---------------------------------------------------------------------------------

SLACK_TEXT_MAX = 40_000
SLACK_HEADER_MAX = 150
SLACK_SECTION_MAX = 3_000
SLACK_FIELD_MAX = 2_000
SLACK_FIELDS_MAX = 10


def _mrkdwn(text: str) -> str:
    # Slack's only required escapes; everything else is literal.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


_ICONS: Mapping[EventKind, str] = {
    "promoted": ":white_check_mark:",
    "rolled_back": ":x:",
    "failover": ":rotating_light:",
    "manual": ":raised_hand:",
    "event": ":information_source:",
}
_EMOJI: Mapping[EventKind, str] = {
    "promoted": "✅",
    "rolled_back": "❌",
    "failover": "🚨",
    "manual": "✋",
    "event": "\N{INFORMATION SOURCE}\ufe0f",
}


def slack_payload(notification: Notification, *, link: str | None) -> dict[str, Any]:
    """Slack-compatible JSON: `text` for clients without blocks, `blocks` for the rest."""
    n = notification
    icon = _ICONS[n.event]
    text = f"{icon} {n.title}: {n.text}"
    suffix = f" Report: {link}" if link else ""
    text = _cut(text, SLACK_TEXT_MAX - len(suffix)) + suffix
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": _cut(n.title, SLACK_HEADER_MAX)}},
        {
            "type": "section",
            "text": {
                "type": "mrkdwn",
                "text": _cut(f"{icon} {_mrkdwn(n.text)}", SLACK_SECTION_MAX),
            },
        },
    ]
    fields = {"Rollout": f"`{n.rollout}`", **{k: _mrkdwn(v) for k, v in n.fields.items()}}
    blocks.append(
        {
            "type": "section",
            "fields": [
                {"type": "mrkdwn", "text": _cut(f"*{k}*\n{v}", SLACK_FIELD_MAX)}
                for k, v in fields.items()
            ][:SLACK_FIELDS_MAX],
        }
    )
    if link:
        blocks.append(
            {
                "type": "actions",
                "elements": [
                    {
                        "type": "button",
                        "text": {"type": "plain_text", "text": "Open the report"},
                        "url": link,
                    }
                ],
            }
        )
    return {"text": text, "blocks": blocks}


# ---- Microsoft Teams -----------------------------------------------------------------------

TEAMS_MAX_BYTES = 28_000  # Teams refuses bigger messages (its documented limit is 28 KB)
_TEAMS_COLOR: Mapping[EventKind, str] = {
    "promoted": "Good",
    "rolled_back": "Attention",
    "failover": "Warning",
    "manual": "Accent",
    "event": "Default",
}


def teams_payload(notification: Notification, *, link: str | None) -> dict[str, Any]:
    """A message with one Adaptive Card attachment, as Teams incoming webhooks and Workflows
    take it: title, the why, a FactSet, and a button to the report."""
    n = notification

    def card(text: str) -> dict[str, Any]:
        facts = [{"title": "Rollout", "value": n.rollout}]
        facts += [{"title": k, "value": v} for k, v in n.fields.items()]
        facts.append({"title": "At", "value": _iso(n.at)})
        content: dict[str, Any] = {
            "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
            "type": "AdaptiveCard",
            "version": "1.4",
            "msteams": {"width": "Full"},
            "body": [
                {
                    "type": "TextBlock",
                    "text": f"{_EMOJI[n.event]} {n.title}",
                    "size": "Medium",
                    "weight": "Bolder",
                    "color": _TEAMS_COLOR[n.event],
                    "wrap": True,
                },
                {"type": "TextBlock", "text": text, "wrap": True},
                {"type": "FactSet", "facts": facts},
            ],
        }
        if link:
            content["actions"] = [
                {"type": "Action.OpenUrl", "title": "Open the report", "url": link}
            ]
        return {
            "type": "message",
            "attachments": [
                {
                    "contentType": "application/vnd.microsoft.card.adaptive",
                    "contentUrl": None,
                    "content": content,
                }
            ],
        }

    return _fit(card, n.text, TEAMS_MAX_BYTES)


def _fit(build: Callable[[str], dict[str, Any]], text: str, max_bytes: int) -> dict[str, Any]:
    """build(text), with `text` cut until the JSON is at most max_bytes."""
    payload = build(text)
    size = len(json.dumps(payload).encode())
    while size > max_bytes and text:
        text = _cut(text, max(1, len(text) - (size - max_bytes) - 16))
        if len(text) <= 1:
            text = ""
        payload = build(text)
        size = len(json.dumps(payload).encode())
    return payload


# ---- Discord -------------------------------------------------------------------------------

DISCORD_CONTENT_MAX = 2_000
DISCORD_TITLE_MAX = 256
DISCORD_DESCRIPTION_MAX = 4_096
DISCORD_FIELDS_MAX = 25
DISCORD_FIELD_NAME_MAX = 256
DISCORD_FIELD_VALUE_MAX = 1_024
DISCORD_EMBED_TOTAL_MAX = 6_000
_DISCORD_COLOR: Mapping[EventKind, int] = {
    "promoted": 0x2EB67D,
    "rolled_back": 0xE01E5A,
    "failover": 0xECB22E,
    "manual": 0x36C5F0,
    "event": 0x8D8D8D,
}


def discord_payload(notification: Notification, *, link: str | None) -> dict[str, Any]:
    """Discord's webhook JSON: a short `content` line and one embed with the details."""
    n = notification
    title = _cut(n.title, DISCORD_TITLE_MAX)
    pairs = [
        (_cut(k, DISCORD_FIELD_NAME_MAX), _cut(v or "-", DISCORD_FIELD_VALUE_MAX))
        for k, v in {"Rollout": n.rollout, **n.fields}.items()
    ][:DISCORD_FIELDS_MAX]
    fields = [{"name": k, "value": v, "inline": True} for k, v in pairs]
    used = len(title) + sum(len(k) + len(v) for k, v in pairs)
    description = _cut(n.text, max(1, min(DISCORD_DESCRIPTION_MAX, DISCORD_EMBED_TOTAL_MAX - used)))
    embed: dict[str, Any] = {
        "title": title,
        "description": description,
        "color": _DISCORD_COLOR[n.event],
        "timestamp": _iso(n.at),
        "fields": fields,
    }
    if link:
        embed["url"] = link
    content = f"{_EMOJI[n.event]} {n.title}: {n.text}"
    suffix = f" Report: {link}" if link else ""
    return {
        "content": _cut(content, DISCORD_CONTENT_MAX - len(suffix)) + suffix,
        "embeds": [embed],
        "allowed_mentions": {"parse": []},  # "@everyone" in a reason pings nobody
    }


# ---- Google Chat ---------------------------------------------------------------------------

GOOGLE_CHAT_TEXT_MAX = 4_096
GOOGLE_CHAT_MAX_BYTES = 32_000


def _chat_escape(text: str) -> str:
    # Card text is a small HTML subset; the plain `text` is not.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def google_chat_payload(notification: Notification, *, link: str | None) -> dict[str, Any]:
    """Google Chat's webhook JSON: `text` (the fallback and notification line) and a card."""
    n = notification
    suffix = f" Report: {link}" if link else ""
    text = _cut(f"{_EMOJI[n.event]} {n.title}: {n.text}", GOOGLE_CHAT_TEXT_MAX - len(suffix))

    def build(why: str) -> dict[str, Any]:
        widgets: list[dict[str, Any]] = [{"textParagraph": {"text": _chat_escape(why)}}]
        widgets += [
            {"decoratedText": {"topLabel": k, "text": _chat_escape(v)}}
            for k, v in {"Rollout": n.rollout, **n.fields}.items()
        ]
        if link:
            widgets.append(
                {
                    "buttonList": {
                        "buttons": [
                            {"text": "Open the report", "onClick": {"openLink": {"url": link}}}
                        ]
                    }
                }
            )
        return {
            "text": text + suffix,
            "cardsV2": [
                {
                    "cardId": f"canary-{n.event}",
                    "card": {
                        "header": {
                            "title": _cut(f"{_EMOJI[n.event]} {n.title}", 200),
                            "subtitle": _iso(n.at),
                        },
                        "sections": [{"widgets": widgets}],
                    },
                }
            ],
        }

    return _fit(build, n.text, GOOGLE_CHAT_MAX_BYTES)


# ---- generic JSON --------------------------------------------------------------------------


def json_payload(
    notification: Notification, *, link: str | None, metadata: Mapping[str, str] = {}
) -> dict[str, Any]:
    """The event as JSON, for incident tools and your own receivers; the webhook's own
    `metadata`, if it has any, as "metadata"."""
    n = notification
    payload = {
        "source": "canary",
        "event": n.event,
        "rollout": n.rollout,
        "target": n.target,
        "title": n.title,
        "text": n.text,
        "at": n.at,
        "time": _iso(n.at),
        "fields": dict(n.fields),
        "report_url": link,
    }
    if metadata:
        payload["metadata"] = dict(metadata)
    return payload


# ---- Flagger's webhook payload ------------------------------------------------------------

_FLAGGER_PHASE: Mapping[EventKind, str] = {"promoted": "Succeeded", "rolled_back": "Failed"}


def flagger_payload(
    notification: Notification, *, link: str | None, metadata: Mapping[str, str] = {}
) -> dict[str, Any]:
    """Flagger's webhook JSON (`{"name", "namespace", "phase", "checksum", "type",
    "metadata"}`, its event hooks' `metadata`: `eventMessage`, `eventType`, `timestamp` in
    milliseconds), so a receiver written for Flagger's `event` webhook reads it as is. The
    Event's reason and the report's link are added to `metadata`, then the webhook's own
    `metadata` where it names a key not already there (Flagger's rule: the event's win)."""
    n = notification
    fields = n.fields
    namespace, _, name = n.target.rpartition("/")
    event_type = fields.get("type") or (
        "Warning" if n.event in ("rolled_back", "failover") else "Normal"
    )
    own = {
        "eventMessage": n.text,
        "eventType": event_type,
        "timestamp": str(int(n.at * 1000)),
    }
    if fields.get("reason"):
        own["eventReason"] = fields["reason"]
    if link:
        own["report"] = link
    for key, value in metadata.items():
        own.setdefault(key, value)
    return {
        "name": fields.get("name", name),
        "namespace": fields.get("namespace", namespace),
        "phase": fields.get("phase") or _FLAGGER_PHASE.get(n.event, ""),
        "checksum": fields.get("checksum", ""),
        # an Event is Flagger's `event`; an outcome or a manual action says which it is
        "type": n.event,
        "metadata": own,
    }


_BUILDERS: Mapping[Format, Callable[..., dict[str, Any]]] = {
    "slack": slack_payload,
    "teams": teams_payload,
    "discord": discord_payload,
    "google_chat": google_chat_payload,
    "json": json_payload,
    "flagger": flagger_payload,
}


def payload_for(
    format: Format,
    notification: Notification,
    *,
    link: str | None,
    metadata: Mapping[str, str] = {},
) -> dict[str, Any]:
    """The JSON body to post to a webhook of `format`, with the webhook's `metadata` in the
    formats that carry it (METADATA_FORMATS; WebhookConfig refuses it with the others)."""
    if metadata and format in METADATA_FORMATS:
        return _BUILDERS[format](notification, link=link, metadata=metadata)
    return _BUILDERS[format](notification, link=link)
