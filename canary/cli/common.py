"""What the `canary` subcommands share: exit statuses, the default address, the target rule.

Where status and the manual commands go is decided here too.

Why a module of its own: the subcommand modules (``main``, ``kubernetes``, ``clusters``,
``report``) all need these, and ``main`` imports the others; keeping them here means no
subcommand module imports ``main`` back.

Where it goes, as kubectl would (`target_mode`): `--server` means a running `canary run`; any
of `--kubeconfig`, `--context`, `-n/--namespace` means a cluster; with neither,
`$CANARY_SERVER` means the static server, and then, like kubectl's defaults, `$KUBECONFIG`,
an existing `~/.kube/config` or a pod's service account (`$KUBERNETES_SERVICE_HOST`) mean a
cluster; otherwise the static server at its default address.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from canary.core.logs import LOG_FORMATS, json_logging

__all__ = [
    "DEFAULT_LISTEN",
    "EXIT_BAD_CONFIG",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_STOPPED",
    "EXIT_UNKNOWN",
    "SERVER_ENV",
    "TARGET_RULE",
    "TOKEN_FILE_ENV",
    "TargetMode",
    "add_log_format",
    "client_token",
    "client_token_file",
    "parse_listen",
    "say",
    "server_token",
    "server_url",
    "target_mode",
    "token_hint",
]

EXIT_OK = 0
EXIT_FAILED = 1  # rolled back / aborted; a refused command
EXIT_BAD_CONFIG = 2  # also argparse's own usage errors
EXIT_STOPPED = 3  # run: stopped before the end; commands: server unreachable
EXIT_UNKNOWN = 4  # commands: no such rollout

DEFAULT_LISTEN = "127.0.0.1:9310"
SERVER_ENV = "CANARY_SERVER"
TOKEN_FILE_ENV = "CANARY_TOKEN_FILE"


def add_log_format(parser: argparse.ArgumentParser) -> None:
    """`--log-format text|json` on a long-running command."""
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        help="text (default) or json: one JSON object per line on stderr (timestamp, level, "
        "logger, message, and rollout, namespace, phase, decision when about a rollout)",
    )


def say(text: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """A line for the operator on stderr: printed as it is, or with --log-format json logged
    as one JSON event (`fields` become its fields), so that every stderr line is JSON."""
    if json_logging():
        logging.getLogger("canary.cli").log(level, text.removeprefix("canary: "), extra=fields)
    else:
        print(text, file=sys.stderr, flush=True)


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [::1]:PORT). Raises ValueError naming what is wrong."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"--listen must be HOST:PORT, e.g. {DEFAULT_LISTEN}, got {text!r}")
    host = host.removeprefix("[").removesuffix("]")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"--listen port must be a number, got {port_text!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"--listen port must be within 0..65535, got {port}")
    return host, port


def server_url(args: argparse.Namespace) -> str:
    """The running server a command talks to: --server, else $CANARY_SERVER, else the default."""
    url: str = args.server or os.environ.get(SERVER_ENV) or f"http://{DEFAULT_LISTEN}"
    return url.rstrip("/")


# ---- status and the manual commands: a `canary run` server or a cluster --------------------


TargetMode = Literal["server", "cluster"]
_CLUSTER_FLAGS = (
    ("kubeconfig", "--kubeconfig"),
    ("context", "--context"),
    ("namespace", "-n"),
    ("all_namespaces", "-A"),
)
TARGET_RULE = (
    "Where it goes: --server URL (or $CANARY_SERVER) is a running `canary run`; --kubeconfig, "
    "--context, -n/--namespace or -A (status) is a cluster. With neither, as kubectl: a cluster when "
    "$KUBECONFIG is set, ~/.kube/config exists or in a pod ($KUBERNETES_SERVICE_HOST), else "
    f"the `canary run` at http://{DEFAULT_LISTEN}."
)


def target_mode(
    args: argparse.Namespace, *, environ: Mapping[str, str] | None = None
) -> tuple[TargetMode, str, bool]:
    """(mode, why, chosen by default) for status and the manual commands.

    Raises ValueError when --server and a cluster flag are both given."""
    env = os.environ if environ is None else environ
    flags = [flag for key, flag in _CLUSTER_FLAGS if getattr(args, key, None)]
    if getattr(args, "server", None):
        if flags:
            raise ValueError(
                f"--server and {', '.join(flags)} name different targets (a `canary run` "
                "server, a cluster): give one"
            )
        return "server", "--server was given", False
    if flags:
        return "cluster", f"{', '.join(flags)} was given", False
    if env.get(SERVER_ENV):
        return "server", f"${SERVER_ENV} is set", True
    if env.get("KUBECONFIG"):
        return "cluster", "$KUBECONFIG is set", True
    home = env.get("HOME")
    config = (Path(home) if home else Path.home()) / ".kube" / "config"
    if config.is_file():
        return "cluster", f"{config} exists", True
    if env.get("KUBERNETES_SERVICE_HOST"):
        return "cluster", "running in a pod ($KUBERNETES_SERVICE_HOST is set)", True
    return (
        "server",
        "no kubeconfig was found ($KUBECONFIG unset, no ~/.kube/config, not in a pod)",
        True,
    )


# ---- the bearer token of a `canary run` / `canary clusters` server -------------------------


def server_token(token_file: str | None, record_dir: Path) -> tuple[Path, str]:
    """(the token file, its token) for a server: `token_file` must exist; the default one,
    `<record_dir>/canary.token`, is created (mode 0600) when missing. Raises ValueError naming
    the file, never quoting it."""
    from canary.server.auth import TOKEN_FILE_NAME, create_token_file, read_token_file

    if token_file:
        path = Path(token_file)
        return path, read_token_file(path)
    path = record_dir / TOKEN_FILE_NAME
    if path.exists():
        return path, read_token_file(path)
    try:
        return path, create_token_file(path)
    except OSError as exc:
        raise ValueError(f"cannot create the token file {path}: {exc.strerror or exc}") from None


def client_token_file(args: argparse.Namespace) -> Path:
    """Where a client command finds the server's token: --token-file, $CANARY_TOKEN_FILE,
    else records/canary.token (the default record directory) under the current directory."""
    from canary.server.auth import TOKEN_FILE_NAME

    given = getattr(args, "token_file", None) or os.environ.get(TOKEN_FILE_ENV)
    return Path(given) if given else Path("records") / TOKEN_FILE_NAME


def client_token(args: argparse.Namespace) -> str | None:
    """The token to send, or None (why is kept on args for `token_hint`)."""
    from canary.server.auth import read_token_file

    try:
        return read_token_file(client_token_file(args))
    except ValueError as exc:
        args.token_problem = str(exc)
        return None


def token_hint(args: argparse.Namespace, status: int) -> str:
    """For a 401/403 answer: where the token came from, and how to give it."""
    if status not in (401, 403):
        return ""
    problem = getattr(args, "token_problem", None)
    where = problem or f"the token was read from {client_token_file(args)}"
    return f" ({where}; give the server's token file with --token-file or ${TOKEN_FILE_ENV})"
