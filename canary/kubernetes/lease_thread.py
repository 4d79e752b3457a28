"""Lease electors on an OS thread of their own, so a busy event loop cannot starve renewals.

Why: at 2,000 rollouts over 2 shards, killing one replica gave the survivor a thousand rollouts
at once; its event loop was saturated (registrations, reconciles) and the shard Lease renewals
on that same loop missed their deadline, so it let go of its shards and took them back nine
times in five minutes, each time stopping and restarting a thousand rollouts (issue 13).
Slots of its own in the HTTP client (`LEASE_IN_FLIGHT`) do not help when the loop itself is
late. `LeaseThread.run(stop)` runs an elector's loop (canary.kubernetes.shards.ShardElector or
canary.kubernetes.client.LeaderElector) on a thread named `canary-leases` with its own event
loop and its own Kube client (an aiohttp session belongs to the loop it was made on), so its
renewals keep their pace however busy the calling loop is.

The calling loop keeps reading `holds()`/`held()`/`is_leader`, which the electors publish as
whole values swapped at once (never a dict mutated in place); they lapse by themselves at the
renew deadline, on the shared monotonic clock, so the fencing argument is unchanged. What the
elector calls back runs on the calling loop: `on_release` (stop the shard's rollouts, awaited
by the elector before it gives the Lease up) and `on_change`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from canary.executors import name_native_thread
from canary.kubernetes.client import Kube, LeaderElector
from canary.kubernetes.shards import ShardElector

__all__ = ["LeaseThread"]

log = logging.getLogger("canary.kubernetes.lease_thread")

Elector = ShardElector | LeaderElector


class LeaseThread:
    """Runs `elector.run(stop)` on a thread of its own with a Kube client from `connect`."""

    def __init__(
        self,
        elector: Elector,
        connect: Callable[[], Awaitable[Kube]],
        *,
        name: str = "canary-leases",
    ) -> None:
        self.elector = elector
        self.connect = connect
        self.name = name

    async def run(self, stop: asyncio.Event) -> None:
        """As `elector.run(stop)`, from the calling loop: returns once the elector has given
        its Leases up after `stop`, its client closed and its thread joined. Cancelled, the
        elector is cancelled as its task would be (no release) and the thread still joined."""
        main = asyncio.get_running_loop()
        loop = asyncio.new_event_loop()
        thread_stop = asyncio.Event()  # bound to `loop` on its first wait, in the thread
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        restore = self._call_back_on(main)
        thread = threading.Thread(
            target=self._main, args=(loop, thread_stop, done), name=self.name, daemon=True
        )
        thread.start()
        finished = asyncio.wrap_future(done)
        stopping = asyncio.create_task(stop.wait(), name=f"{self.name} stop")
        try:
            either: set[asyncio.Future[Any]] = {stopping, finished}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():
                _in_thread(loop, thread_stop.set)
            await finished  # what ended the elector, raised here
        except asyncio.CancelledError:
            _in_thread(loop, _cancel_all, loop)
            with contextlib.suppress(Exception):
                await asyncio.shield(finished)
            raise
        finally:
            stopping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stopping
            if finished.done():
                thread.join()  # its last act completed `done`: this does not wait
            restore()

    def _main(
        self,
        loop: asyncio.AbstractEventLoop,
        stop: asyncio.Event,
        done: concurrent.futures.Future[None],
    ) -> None:
        name_native_thread(self.name)
        try:
            # The Runner cancels what is left, shuts down async generators and the default
            # executor (Kube.connect may use it), and closes the loop.
            with asyncio.Runner(loop_factory=lambda: loop) as runner:
                runner.run(self._serve(stop))
        except asyncio.CancelledError:
            done.set_result(None)
        except BaseException as exc:  # handed to the caller, which raises it
            done.set_exception(exc)
        else:
            done.set_result(None)

    async def _serve(self, stop: asyncio.Event) -> None:
        kube = await self.connect()
        given = self.elector.kube
        self.elector.kube = kube
        try:
            await self.elector.run(stop)
        finally:
            self.elector.kube = given
            await kube.close()

    def _call_back_on(self, main: asyncio.AbstractEventLoop) -> Callable[[], None]:
        """Make the elector's callbacks run on `main`; returns what undoes it."""
        if isinstance(self.elector, ShardElector):
            shards = self.elector
            on_release = shards.on_release
            if on_release is None:
                return lambda: None

            async def on_main(index: int) -> None:
                async def call() -> None:
                    await on_release(index)

                # Awaited: the elector writes the release only once the rollouts stopped.
                await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call(), main))

            def restore_release() -> None:
                shards.on_release = on_release

            shards.on_release = on_main
            return restore_release
        leader = self.elector
        on_change = leader.on_change
        if on_change is None:
            return lambda: None

        def on_change_main(leading: bool) -> None:
            main.call_soon_threadsafe(on_change, leading)

        def restore_change() -> None:
            leader.on_change = on_change

        leader.on_change = on_change_main
        return restore_change


def _in_thread(loop: asyncio.AbstractEventLoop, call: Callable[..., object], *args: object) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: the thread is done already
        loop.call_soon_threadsafe(call, *args)


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    for task in asyncio.all_tasks(loop):
        task.cancel()
