"""An aiohttp application served on a free port of 127.0.0.1 for the length of a test, and a
webhook receiver served so."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@asynccontextmanager
async def on_loopback(app: web.Application) -> AsyncIterator[str]:
    """Serve `app`; yields its base URL (`http://127.0.0.1:PORT`), cleaned up on exit."""
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@dataclass
class Receiver:
    """A webhook endpoint that answers with scripted statuses and keeps what it got."""

    url: str = ""
    statuses: list[int] = field(default_factory=list)  # consumed per request; then 200
    retry_after: list[str] = field(default_factory=list)  # Retry-After headers, likewise
    hang: asyncio.Event | None = None  # when set: never answer until released
    received: list[dict[str, Any]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append(await request.json())
        self.arrived.set()
        if self.hang is not None:
            await self.hang.wait()
        status = self.statuses.pop(0) if self.statuses else 200
        headers = {"Retry-After": self.retry_after.pop(0)} if self.retry_after else None
        return web.Response(status=status, text="nope" if status >= 400 else "ok", headers=headers)


@asynccontextmanager
async def receiving() -> AsyncIterator[Receiver]:
    """A Receiver served on loopback (its url set); a hanging one is released on exit,
    before the cleanup, which waits for its handlers."""
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook/{secret}", rec.handle)
    async with on_loopback(app) as base:
        rec.url = f"{base}/hook/T000-secret"
        try:
            yield rec
        finally:
            if rec.hang is not None:
                rec.hang.set()
