"""Who may call the server's guarded routes: the `Access` seam and the static-mode token.

Why a seam: the HTTP server guards every route but the probes and /metrics the same way
(a bearer token, no cross-origin requests, see canary.server.app), but who a token belongs to
depends on the mode:

- `canary run` (static targets): one secret, `TokenAccess`, read from a file the operator
  gives (`--token-file`) or generated at start into the record directory with mode 0600.
  Whoever can read that file may command the rollouts; the token names nobody, so the
  `who` a caller writes is kept as a label (`Identity.authoritative` is False).
- `canary kubernetes`: canary.kubernetes.access asks the cluster (TokenReview, then
  SubjectAccessReview), and the recorded `who` is the cluster's user name, never the body's.

Tokens are compared with `hmac.compare_digest`, and no message ever quotes a token.
"""

from __future__ import annotations

import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

__all__ = [
    "TOKEN_FILE_NAME",
    "Access",
    "Denied",
    "Identity",
    "TokenAccess",
    "Verb",
    "create_token_file",
    "read_token_file",
]

Verb = Literal["get", "patch"]  # a read of rollouts; a command (it changes traffic)
TOKEN_FILE_NAME = "canary.token"  # in the record directory when no --token-file is given
_MAX_TOKEN_BYTES = 4096


@dataclass(frozen=True, slots=True)
class Identity:
    """Who called. `authoritative`: `name` is the cluster's own, so it is what gets recorded
    as `who`; otherwise the caller's `who` is kept as a label (static mode's shared token)."""

    name: str
    authoritative: bool


class Denied(Exception):
    """401 (who are you?), 403 (you may not) or 503 (cannot tell now); `message` never
    quotes the token."""

    def __init__(self, status: Literal[401, 403, 503], message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Access(Protocol):
    """Decides one request: `verb` on the rollout `name` in `namespace` (either None when the
    route is not about one rollout, e.g. the list). Returns the caller or raises Denied."""

    async def authorize(
        self, token: str | None, *, verb: Verb, namespace: str | None, name: str | None
    ) -> Identity: ...


class TokenAccess:
    """Static mode: the one token, from a file."""

    def __init__(self, token: str) -> None:
        if len(token) < 16:
            raise ValueError("a token must be at least 16 characters")
        self._token = token.encode()

    async def authorize(
        self, token: str | None, *, verb: Verb, namespace: str | None, name: str | None
    ) -> Identity:
        if not token:
            raise Denied(401, "this route needs Authorization: Bearer <token> (see --token-file)")
        if not hmac.compare_digest(token.encode(), self._token):
            raise Denied(401, "the bearer token is not this server's")
        return Identity("token", authoritative=False)


def read_token_file(path: Path) -> str:
    """The token in `path` (surrounding whitespace ignored). Raises ValueError naming the
    file, never quoting its content."""
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read the token file {path}: {exc.strerror or exc}") from None
    if len(data) > _MAX_TOKEN_BYTES:
        raise ValueError(f"the token file {path} is larger than {_MAX_TOKEN_BYTES} bytes")
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ValueError(f"the token file {path} is not ASCII text") from None
    if len(token) < 16 or any(c.isspace() for c in token):
        raise ValueError(f"the token file {path} must hold one token of at least 16 characters")
    return token


def create_token_file(path: Path) -> str:
    """A new random token written to `path` with mode 0600 (replacing the old one)."""
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (token + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return token
