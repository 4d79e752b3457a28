"""Redaction: URL credentials, tokens and API keys are masked wherever text or data goes out."""

from __future__ import annotations

import io
import logging

import pytest

from canary.core.redact import (
    MASK,
    RedactingFilter,
    install_log_redaction,
    is_secret_key,
    redact,
    redact_text,
    redact_url,
)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://alice:s3cret@127.0.0.1:9090", "http://***@127.0.0.1:9090"),
        ("https://token@prom.example/api?x=1", "https://***@prom.example/api?x=1"),
        ("https://h/x?api_key=k1&a=b&token=t2", "https://h/x?api_key=***&a=b&token=***"),
        ("https://h/cb#access_token=zz&state=1", "https://h/cb#access_token=***&state=1"),
        ("http://127.0.0.1:9090", "http://127.0.0.1:9090"),
        ("http://h/q?query=up&time=1.5", "http://h/q?query=up&time=1.5"),
    ],
)
def test_redact_url_masks_userinfo_and_secret_parameters(url: str, shown: str) -> None:
    """Userinfo becomes ***@ and secret query parameters lose their values; the rest stays."""
    assert redact_url(url) == shown


def test_redact_url_without_path_keeps_only_the_host() -> None:
    """Slack-style webhook URLs carry their secret in the path: only scheme and host remain."""
    assert redact_url("https://hooks.slack.com/services/T1/B2/XYZ", keep_path=False) == (
        "https://hooks.slack.com/…"
    )
    assert redact_url("https://u:p@h/?sig=1", keep_path=False) == "https://***@h/…"
    assert redact_url("https://h", keep_path=False) == "https://h"


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("prometheus unreachable at http://alice:s3cret@127.0.0.1:9/: refused", "s3cret"),
        ("GET https://h/api?apikey=abc123 failed", "abc123"),
        ("Authorization: Bearer eyJhbGciOi.payload.sig", "eyJhbGciOi"),
        ("headers {'X-API-Key': 'pdns-key-42'}", "pdns-key-42"),
        ("password=hunter2 user=bob", "hunter2"),
        ('{"client_secret": "cs-9"}', "cs-9"),
    ],
)
def test_redact_text_masks_secrets_inside_free_text(text: str, secret: str) -> None:
    """Error messages and reasons keep their words but lose the secret they quote."""
    clean = redact_text(text)
    assert secret not in clean and MASK in clean


def test_redact_text_leaves_ordinary_text_and_secret_references_alone() -> None:
    """Text without secrets is returned as is; a key that names where a secret lives stays."""
    for text in (
        "no data: empty result for http_requests_total",
        "router.api_key_env: $PDNS_API_KEY is not set",
        "token bucket refilled",
    ):
        assert redact_text(text) == text


def test_redact_walks_data_and_masks_secret_keys() -> None:
    """Values under secret-looking keys are masked (nested too), URLs in strings redacted,
    references (api_key_env) and empty values kept; clean data comes back unchanged."""
    data = {
        "metrics": {"url": "http://alice:s3cret@prom:9090"},
        "router": {"api_key": "k", "api_key_env": "PDNS_API_KEY", "token": ""},
        "auth": {"username": "alice", "password": "p"},
        "headers": [{"Authorization": "Bearer abc"}],
        "steps": [5, 10],
    }
    assert redact(data) == {
        "metrics": {"url": "http://***@prom:9090"},
        "router": {"api_key": MASK, "api_key_env": "PDNS_API_KEY", "token": ""},
        "auth": {"username": MASK, "password": MASK},
        "headers": [{"Authorization": MASK}],
        "steps": [5, 10],
    }
    clean = {"steps": [5, 10], "reason": "canary passed", "nested": [{"a": 1.5}]}
    assert redact(clean) is clean


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("password", True),
        ("X-API-Key", True),
        ("webhookToken", True),
        ("client_secret", True),
        ("api_key_env", False),
        ("secret_name", False),
        ("password_file", False),
        ("no_data_reason", False),
        ("tick_s", False),
    ],
)
def test_secret_keys(key: str, secret: bool) -> None:
    """Which keys hold secrets: credentials yes, where they are kept no."""
    assert is_secret_key(key) is secret


def test_log_filter_redacts_messages_arguments_and_exceptions() -> None:
    """A handler with the filter never writes credentials: not from a %-argument, nor from
    an exception's text in the traceback."""
    stream = io.StringIO()
    logger = logging.getLogger("test.redact")
    logger.propagate = False
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    install_log_redaction(logger)
    install_log_redaction(logger)  # idempotent
    assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
    try:
        logger.warning("fetch from %s failed", "http://alice:s3cret@prom:9090")
        try:
            raise ConnectionError("cannot reach https://bob:hunter2@h/?token=t0k3n")
        except ConnectionError:
            logger.exception("tick failed")
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert "fetch from http://***@prom:9090 failed" in out
    assert "ConnectionError: cannot reach https://***@h/?token=***" in out
    for secret in ("s3cret", "hunter2", "t0k3n"):
        assert secret not in out
