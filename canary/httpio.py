"""Bounded reads of HTTP answers from servers canary does not control.

Why: a webhook receiver, a health endpoint, a PowerDNS API or a Prometheus that answers with a
body that never ends (or is merely huge) must not take the controller's memory with it, and a
timeout alone bounds only the time: on loopback a server sends gigabytes within one. So every
answer is read through one of these, never with `read()`, `text()` or `json()`:

- `read_bounded`: the whole body, or `AnswerTooLarge` as soon as it passes the limit (a body
  whose Content-Length says so is refused before any of it is read);
- `read_prefix`: at most the first bytes, for what only needs a look (an error's first line,
  a health check's status, as the kubelet reads at most 10 KiB of a probe's body).

What is left unread is not drained: aiohttp closes that connection instead of reusing it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported lazily where it is used: `canary` commands that make no request
    import aiohttp

__all__ = ["AnswerTooLarge", "read_bounded", "read_prefix"]

_CHUNK = 1 << 16


class AnswerTooLarge(ValueError):
    """The answer's body is larger than the reader's limit (a ValueError, as a bad body is)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"answer larger than {limit} bytes")
        self.limit = limit


async def read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, at most `limit` bytes; AnswerTooLarge past that."""
    if response.content_length is not None and response.content_length > limit:
        raise AnswerTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(_CHUNK):
        size += len(chunk)
        if size > limit:
            raise AnswerTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_prefix(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """At most the first `limit` bytes of the body; the rest is left unread."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(min(_CHUNK, max(1, limit))):
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)[:limit]
