"""HAProxy as a TrafficRouter, over the runtime API on its admin unix socket.

This is how services on hosts or VMs are split (topology 3), and how the demo splits.
The runtime API is used in its non-interactive form: one connection per command, the server
answers and closes. That avoids prompt parsing and leaves no half-read stream behind after
a timeout.

- `set weight <backend>/<server> <w>` on both servers: primary 100-p, canary p. The server
  whose weight rises is set first, so the backend never has every server at weight 0
  between the two commands (weight 0 is valid: drained, no new requests), and roundrobin
  follows the new split at once instead of after a burst (see set_weight).
- `show servers state <backend>` is read back; columns are found by name from its header,
  after the format version line, because HAProxy adds columns between versions.
- HAProxy answers an accepted command with a bare newline. Anything else is its error
  message, raised as RouterRejected carrying that text. A missing socket, a refused
  connection or a timeout is RouterUnreachable.
- After each accepted weight, `show servers state` is written to the server-state file
  (`server-state-file` + `load-server-state-from-file global`), so a reload keeps weights.
- A/B routing (a `Match` and an `ab_map`): the backend holds one static rule that sends the
  requests whose header (or cookie) value is a key of a map file to the canary server, even
  at weight 0 (`use-server` ignores weights)::

      use-server canary if { req.hdr(X-Canary),map_str(/etc/haproxy/app-ab.map) -m str canary }

  The match is turned on and off with `add map`/`set map`/`del map` over the runtime API,
  so no reload; `show map` reads it back. The map file is rewritten after each change so a
  reload keeps it, as the server-state file keeps weights.
- Session affinity (`affinity="cookie"`) is HAProxy's cookie persistence, configured in
  haproxy.cfg (`cookie SRV insert indirect nocache`, `cookie <name>` on each server): a
  client stays on the server it got first while the weights move. HAProxy still sends
  persistent clients to a server at weight 0, so the router puts a server that must get no
  traffic in maintenance (`set server B/S state maint`: its cookie is then ignored) and back
  to `ready` before it gets a share; the canary stays ready while the A/B match is on. The
  admin state is read back after each write, and a server in maintenance counts as weight 0
  in `get_weight`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import weakref
from pathlib import Path

from canary.executors import run_blocking
from canary.routers.base import Match, RouterError, RouterRejected, RouterUnreachable

__all__ = [
    "HAProxyRouter",
    "ab_rule",
    "parse_map",
    "parse_servers_state",
    "runtime_command",
    "save_server_state",
]

_MAX_ANSWER = 16 * 1024 * 1024
# srv_admin_state bits that mean maintenance: forced (0x01), inherited (0x02), from the
# config (0x04), from DNS resolution (0x20).
_MAINT_FLAGS = 0x01 | 0x02 | 0x04 | 0x20

# HAProxy's admin socket takes few connections at once (`stats maxconn`, 10 by default) and
# drops the rest: 50 commands at once lost 29, 1,000 lost 979 (issue 13: 667 weight changes
# refused when 500 rollouts started). So at most this many commands per socket are in flight
# from one controller; the others wait their turn (within their own timeout).
MAX_COMMANDS_IN_FLIGHT = 8
_gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Semaphore]] = (
    weakref.WeakKeyDictionary()
)


def _gate(path: str) -> asyncio.Semaphore:
    """The socket's semaphore on the running loop (a semaphore belongs to one loop)."""
    per_loop = _gates.setdefault(asyncio.get_running_loop(), {})
    gate = per_loop.get(path)
    if gate is None:
        gate = per_loop[path] = asyncio.Semaphore(MAX_COMMANDS_IN_FLIGHT)
    return gate


async def runtime_command(socket_path: str | Path, command: str, *, timeout_s: float = 5.0) -> str:
    """Send one command to HAProxy's runtime API and return its whole answer.

    Raises RouterUnreachable when the socket is missing, refuses, or does not answer in time.
    """
    if "\n" in command or ";" in command:
        # A newline or ';' would smuggle a second command into the same connection.
        raise ValueError(f"one runtime command at a time, without ';' or newlines: {command!r}")
    path = str(socket_path)
    try:
        async with asyncio.timeout(timeout_s), _gate(path):
            reader, writer = await asyncio.open_unix_connection(path, limit=_MAX_ANSWER)
            try:
                writer.write(command.encode() + b"\n")
                await writer.drain()
                data = await reader.read(-1)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except TimeoutError as exc:
        raise RouterUnreachable(
            f"HAProxy admin socket {path}: no answer to {command!r} within {timeout_s:g}s"
        ) from exc
    except FileNotFoundError as exc:
        raise RouterUnreachable(f"HAProxy admin socket {path} does not exist") from exc
    except OSError as exc:
        raise RouterUnreachable(f"HAProxy admin socket {path}: {exc.strerror or exc}") from exc
    return data.decode(errors="replace")


def parse_servers_state(text: str) -> list[dict[str, str]]:
    """Rows of `show servers state`, as dicts keyed by the header's column names.

    The answer is a format version line ("1"), a header line starting with "# " that names
    the columns, then one space-separated row per server.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) < 2 or not lines[1].startswith("#"):
        raise ValueError(f"not a 'show servers state' answer: {text[:200]!r}")
    if lines[0].strip() != "1":
        raise ValueError(f"unknown 'show servers state' format version {lines[0].strip()!r}")
    columns = lines[1].lstrip("#").split()
    rows = []
    for line in lines[2:]:
        if line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) < len(columns):
            raise ValueError(f"short 'show servers state' row: {line!r}")
        rows.append(dict(zip(columns, fields, strict=False)))
    return rows


async def save_server_state(
    socket_path: str | Path, state_file: str | Path, *, timeout_s: float = 5.0
) -> None:
    """Write `show servers state` (all backends) to the server-state file, atomically."""
    answer = await runtime_command(socket_path, "show servers state", timeout_s=timeout_s)
    try:
        parse_servers_state(answer)
    except ValueError as exc:
        raise RouterRejected("show servers state", answer) from exc
    try:
        await run_blocking("files", _write_atomically, Path(state_file), answer)
    except OSError as exc:
        raise RouterError(f"server-state file {state_file} not written: {exc}") from exc


def parse_map(text: str) -> dict[str, str]:
    """Entries of `show map <file>`: one `<id> <key> <value>` line each."""
    entries: dict[str, str] = {}
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3 or not fields[0].startswith("0x"):
            raise ValueError(f"not a 'show map' line: {line[:200]!r}")
        entries[fields[1]] = fields[2]
    return entries


def ab_rule(match: Match, map_file: str | Path, canary_server: str) -> str:
    """The backend line that sends requests matching `match` to the canary server, as
    users put it in haproxy.cfg (one per backend, before the `server` lines)."""
    fetch = f"req.hdr({match.name})" if match.kind == "header" else f"req.cook({match.name})"
    return f"use-server {canary_server} if {{ {fetch},map_str({map_file}) -m str {canary_server} }}"


def _write_atomically(path: Path, text: str) -> None:
    # A temporary name of its own: routers sharing one HAProxy save the same state file at
    # once, and a shared "<name>.tmp" was moved away under the next writer's feet.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class HAProxyRouter:
    """Splits a backend between two servers by weight: primary 100-p, canary p."""

    def __init__(
        self,
        socket_path: str | Path,
        backend: str,
        primary_server: str,
        canary_server: str,
        *,
        name: str | None = None,
        state_file: str | Path | None = None,
        timeout_s: float = 5.0,
        match: Match | None = None,
        ab_map: str | Path | None = None,
        affinity: str | None = None,
    ) -> None:
        for label, value in (
            ("backend", backend),
            ("primary_server", primary_server),
            ("canary_server", canary_server),
        ):
            if not value or any(c.isspace() or c in "/;" for c in value):
                raise ValueError(
                    f"HAProxyRouter {label} must be a non-empty name without spaces, '/' or ';', got {value!r}"
                )
        if primary_server == canary_server:
            raise ValueError(f"primary_server and canary_server are both {primary_server!r}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.socket_path = Path(socket_path)
        self.backend = backend
        self.primary_server = primary_server
        self.canary_server = canary_server
        self.name = name or f"haproxy:{backend}"
        self.state_file = Path(state_file) if state_file is not None else None
        self.timeout_s = timeout_s
        if (match is None) != (ab_map is None):
            raise ValueError("HAProxyRouter: A/B routing needs both a match and an ab_map")
        if ab_map is not None and any(c.isspace() or c == ";" for c in str(ab_map)):
            raise ValueError(
                f"HAProxyRouter ab_map must be a path without spaces or ';', got {ab_map!r}"
            )
        if affinity not in (None, "cookie"):
            raise ValueError(f"HAProxyRouter affinity must be 'cookie' or None, got {affinity!r}")
        self.match = match
        self.ab_map = Path(ab_map) if ab_map is not None else None
        self.affinity = affinity

    def __repr__(self) -> str:
        return (
            f"HAProxyRouter({str(self.socket_path)!r}, {self.backend!r}, "
            f"{self.primary_server!r}, {self.canary_server!r})"
        )

    async def _accepted(self, command: str) -> None:
        answer = await runtime_command(self.socket_path, command, timeout_s=self.timeout_s)
        if not answer:
            # Not even the bare newline: no evidence the command was applied.
            raise RouterUnreachable(
                f"HAProxy admin socket {self.socket_path} closed without answering {command!r}"
            )
        if answer.strip():
            raise RouterRejected(command, answer)

    async def set_weight(self, canary_percent: int) -> None:
        """Set primary to 100-p and canary to p (the A/B match off, if any); then save the
        state file, if any."""
        await self.set_route(canary_percent, False)

    async def _set_weights(self, canary_percent: int) -> None:
        targets = {self.primary_server: 100 - canary_percent, self.canary_server: canary_percent}
        try:
            current = await self.weights()
        except RouterRejected:
            current = {}  # e.g. unknown backend: `set weight` below says so in HAProxy's words
        # Raise before lowering. The backend never has every server at weight 0 between the
        # two commands, and roundrobin's scheduler takes the change smoothly: lowering first
        # let the raised server take a burst of ~2 x the total weight in requests (measured
        # with HAProxy 2.6). An unknown current weight counts as 0 (larger target first).
        order = sorted(targets, key=lambda srv: targets[srv] - current.get(srv, 0), reverse=True)
        for server in order:
            if current.get(server) != targets[server]:
                await self._accepted(f"set weight {self.backend}/{server} {targets[server]}")

    async def set_route(self, canary_percent: int, match: bool) -> None:
        """Set the weight and turn the A/B match on or off; then save the state file, if any.
        The match goes off first and on last, so the canary never takes matching requests at
        a weight it is being moved away from. With affinity, servers that get traffic are
        made ready before the weights move and the others put in maintenance after."""
        if isinstance(canary_percent, bool) or not isinstance(canary_percent, int):
            raise TypeError(f"canary_percent must be an int, got {canary_percent!r}")
        if not 0 <= canary_percent <= 100:
            raise ValueError(f"canary_percent must be within 0..100, got {canary_percent}")
        if match and self.match is None:
            raise RouterError(f"{self.name} is not set up for A/B routing")
        serving = {
            self.primary_server: canary_percent < 100,
            self.canary_server: canary_percent > 0 or match,
        }
        if not match:
            await self._set_map_entry(False)
        if self.affinity is not None:
            await self._set_admin({s: True for s, on in serving.items() if on})
        await self._set_weights(canary_percent)
        if self.affinity is not None:
            await self._set_admin({s: False for s, on in serving.items() if not on})
            states = await self.in_maintenance()
            wrong = [s for s, on in serving.items() if states.get(s) is not (not on)]
            if wrong:
                raise RouterRejected(
                    f"set server {self.backend}/{wrong[0]} state",
                    f"read back {'in maintenance' if states.get(wrong[0]) else 'ready'}, "
                    f"expected {'ready' if serving[wrong[0]] else 'in maintenance'}",
                )
        if match:
            await self._set_map_entry(True)
        if self.state_file is not None:
            await self.save_state(self.state_file)

    async def _set_admin(self, ready: dict[str, bool]) -> None:
        states = await self.in_maintenance()
        for server, on in ready.items():
            if states.get(server) is (not on):
                continue
            await self._accepted(
                f"set server {self.backend}/{server} state {'ready' if on else 'maint'}"
            )

    async def in_maintenance(self) -> dict[str, bool]:
        """Whether each server of the backend is in maintenance (any of HAProxy's maint
        admin flags: forced, inherited, from config, from DNS), by server name."""
        rows = await self._rows()
        try:
            return {
                row["srv_name"]: bool(int(row["srv_admin_state"]) & _MAINT_FLAGS) for row in rows
            }
        except (KeyError, ValueError) as exc:
            raise RouterRejected(
                f"show servers state {self.backend}", f"no admin state in: {rows}"
            ) from exc

    async def _map_entries(self) -> dict[str, str]:
        command = f"show map {self.ab_map}"
        answer = await runtime_command(self.socket_path, command, timeout_s=self.timeout_s)
        if not answer:
            raise RouterUnreachable(
                f"HAProxy admin socket {self.socket_path} closed without answering {command!r}"
            )
        try:
            return parse_map(answer)
        except ValueError as exc:
            # e.g. "Unknown map identifier": haproxy.cfg does not use the file
            raise RouterRejected(command, answer) from exc

    async def _set_map_entry(self, on: bool) -> None:
        if self.match is None or self.ab_map is None:
            if on:
                raise RouterError(f"{self.name} is not set up for A/B routing")
            return
        key, value = self.match.value, self.canary_server
        entries = await self._map_entries()
        if on and entries.get(key) != value:
            verb = "set" if key in entries else "add"
            await self._accepted(f"{verb} map {self.ab_map} {key} {value}")
        elif not on and key in entries:
            await self._accepted(f"del map {self.ab_map} {key}")
        else:
            return
        # The file is what a reload loads: keep it in step with the runtime map.
        text = "".join(f"{k} {v}\n" for k, v in (await self._map_entries()).items())
        try:
            await run_blocking("files", _write_atomically, self.ab_map, text)
        except OSError as exc:
            raise RouterError(f"A/B map file {self.ab_map} not written: {exc}") from exc

    async def get_match(self) -> bool:
        """Whether requests matching the A/B match go to the canary server now."""
        if self.match is None or self.ab_map is None:
            return False
        return (await self._map_entries()).get(self.match.value) == self.canary_server

    async def weights(self) -> dict[str, int]:
        """Current weights (srv_uweight) of the backend's servers, by server name."""
        rows = await self._rows()
        try:
            return {row["srv_name"]: int(row["srv_uweight"]) for row in rows}
        except (KeyError, ValueError) as exc:
            raise RouterRejected(
                f"show servers state {self.backend}", f"unexpected columns or values: {rows}"
            ) from exc

    async def _rows(self) -> list[dict[str, str]]:
        command = f"show servers state {self.backend}"
        answer = await runtime_command(self.socket_path, command, timeout_s=self.timeout_s)
        if not answer:
            raise RouterUnreachable(
                f"HAProxy admin socket {self.socket_path} closed without answering {command!r}"
            )
        try:
            rows = parse_servers_state(answer)
        except ValueError as exc:
            raise RouterRejected(command, answer) from exc
        return rows

    async def get_weight(self) -> int:
        """The canary's share in percent: round(100 * w_canary / (w_canary + w_primary))."""
        weights = await self.weights()
        missing = [s for s in (self.primary_server, self.canary_server) if s not in weights]
        if missing:
            raise RouterRejected(
                f"show servers state {self.backend}",
                f"no server {', '.join(missing)} in backend {self.backend} "
                f"(has: {', '.join(sorted(weights)) or 'none'})",
            )
        primary, canary = weights[self.primary_server], weights[self.canary_server]
        if self.affinity is not None:
            # A server in maintenance takes nothing, whatever its weight.
            maint = await self.in_maintenance()
            primary = 0 if maint.get(self.primary_server) else primary
            canary = 0 if maint.get(self.canary_server) else canary
        if primary + canary == 0:
            raise RouterError(
                f"backend {self.backend}: both {self.primary_server} and {self.canary_server} "
                "are at weight 0, so no traffic is split at all"
            )
        return round(100 * canary / (primary + canary))

    async def save_state(self, path: str | Path) -> None:
        """Write `show servers state` to `path` (the server-state file) for reloads."""
        await save_server_state(self.socket_path, path, timeout_s=self.timeout_s)
