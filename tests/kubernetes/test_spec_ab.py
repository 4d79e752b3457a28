"""A/B and session affinity annotations: what parses, and each conflict named by its key."""

from __future__ import annotations

import pytest

from canary.kubernetes.spec import SpecError, markdown_table, parse_annotations
from canary.routers.base import Match

BASE = {
    "canary.dev/enabled": "true",
    "canary.dev/router": "ingress-nginx",
    "canary.dev/ingress": "app",
}
GATEWAY = {
    "canary.dev/enabled": "true",
    "canary.dev/router": "gateway-api",
    "canary.dev/httproute": "app",
}


def test_header_match_and_duration_make_an_ab_rollout() -> None:
    """match-header + ab-duration: A/B mode with that match; the machine gets the duration."""
    spec = parse_annotations(
        {**BASE, "canary.dev/match-header": "X-Canary=always", "canary.dev/ab-duration": "5m"}
    )
    assert spec.match == Match("header", "X-Canary", "always")
    rollout = spec.rollout_spec()
    assert rollout.ab and rollout.ab_duration_s == 300.0


def test_cookie_match_and_affinity_on_ingress_nginx() -> None:
    """match-cookie names a cookie (value `always`); affinity cookie is accepted."""
    spec = parse_annotations(
        {
            **BASE,
            "canary.dev/match-cookie": "canary",
            "canary.dev/ab-duration": "90s",
            "canary.dev/affinity": "cookie",
        }
    )
    assert spec.match == Match("cookie", "canary", "always") and spec.affinity == "cookie"


def test_no_ab_annotations_means_weight_steps() -> None:
    """Without A/B annotations nothing changes: weight steps, no match."""
    spec = parse_annotations(BASE)
    assert spec.match is None and not spec.rollout_spec().ab


@pytest.mark.parametrize(
    ("extra", "key", "words"),
    [
        ({"canary.dev/match-header": "X-Canary=always"}, "match-header", "ab-duration"),
        ({"canary.dev/ab-duration": "5m"}, "ab-duration", "match-header or"),
        (
            {
                "canary.dev/match-header": "X-Canary=always",
                "canary.dev/match-cookie": "canary",
                "canary.dev/ab-duration": "5m",
            },
            "match-cookie",
            "not both",
        ),
        (
            {
                "canary.dev/match-header": "X-Canary=always",
                "canary.dev/ab-duration": "5m",
                "canary.dev/steps": "10,20",
            },
            "steps",
            "replaces the weight steps",
        ),
        ({"canary.dev/match-header": "X-Canary"}, "match-header", "Name=value"),
        ({"canary.dev/match-header": "X Canary=1"}, "match-header", "token"),
        ({"canary.dev/match-header": "X-Canary=a b"}, "match-header", "value"),
        (
            {"canary.dev/match-cookie": "canary=yes", "canary.dev/ab-duration": "5m"},
            "match-cookie",
            "always",
        ),
        ({"canary.dev/ab-duration": "soon"}, "ab-duration", "duration"),
        ({"canary.dev/affinity": "ip"}, "affinity", "must be one of cookie"),
    ],
)
def test_bad_ab_annotations_are_named(extra: dict[str, str], key: str, words: str) -> None:
    """Each inconsistent or malformed A/B annotation is reported under its own key."""
    with pytest.raises(SpecError) as caught:
        parse_annotations({**BASE, **extra})
    assert words in caught.value.problems[f"canary.dev/{key}"], caught.value.problems


def test_gateway_api_refuses_session_affinity_by_name() -> None:
    """Gateway API has no standard session affinity: refused, never accepted and ignored;
    its header and cookie matches are accepted."""
    with pytest.raises(SpecError) as caught:
        parse_annotations({**GATEWAY, "canary.dev/affinity": "cookie"})
    assert "no standard session affinity" in caught.value.problems["canary.dev/affinity"]
    spec = parse_annotations(
        {**GATEWAY, "canary.dev/match-cookie": "beta=yes", "canary.dev/ab-duration": "1m"}
    )
    assert spec.match == Match("cookie", "beta", "yes")


def test_the_readme_table_lists_the_ab_keys() -> None:
    """The generated annotation table documents every A/B and affinity key."""
    table = markdown_table()
    for key in ("match-header", "match-cookie", "ab-duration", "affinity"):
        assert f"`canary.dev/{key}`" in table
