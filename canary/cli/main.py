"""The `canary` command (also `python -m canary`).

Subcommands::

    canary run --config rollout.yaml [--config other.yaml] [--listen 127.0.0.1:9310]
               [--token-file FILE] [--public-reads] [--allow-webhook-host HOST ...]
    canary promote|abort|pause|resume NAME [--server URL] [--token-file F] [--who W] [--reason R]
    canary status [NAME] [--server URL] [--token-file F] [-n NS | -A] [-o json|yaml|wide]
                  [-w [--interval 2]] [--wait promoted|done --timeout 10m]   canary.cli.status
    canary validate FILE...                check config files, print the effective settings
    canary demo [...]                      the local demo (canary.demo.main)
    canary report NAME|RECORD [...]        canary.cli.report
    canary kubernetes [...]                canary.cli.kubernetes
    canary clusters|failover|failback ...  canary.cli.clusters
    canary loadtest [--allow-host P ...]   generated load for rollout webhooks (canary.cli.loadtest)

Why it is built this way:

- **Subcommand modules.** Each of `report`, `kubernetes` and `clusters` in this package has
  `add_parser(subparsers)`, which adds its own subcommands (setting
  `func=callable(args) -> int`); `build_parser` calls them. What they share (exit statuses,
  `parse_listen`, the default address, where commands go) is in `common`, so none of them
  imports this module back.
- **Forwarded commands.** `canary demo ...` hands its raw arguments to `canary.demo.main`
  (imported only then), so the demo owns its flags and `canary` works without it.
- **Static or cluster, as kubectl would.** `promote|abort|pause|resume|status` talk either to
  a running `canary run` over HTTP or to a cluster (canary.cli.kubernetes's
  `manual_command(args)` / `status(args)`). `common.target_mode` decides: `--server` means the
  static server; any of `--kubeconfig`, `--context`, `-n/--namespace` means a cluster; with
  neither, `$CANARY_SERVER` means the static server, and then, like kubectl's defaults,
  `$KUBECONFIG`, an existing `~/.kube/config` or a pod's service account
  (`$KUBERNETES_SERVICE_HOST`) mean a cluster; otherwise the static server at its default
  address. When that default choice cannot reach anything, the error says which was chosen
  and why.

**Commands need the token.** `canary run` guards commands and reads with a bearer token:
`--token-file FILE`, else `<record_dir>/canary.token` (of the first config), created with mode
0600 when missing; the path is printed at start. The client commands read the same file
(`--token-file`, else `$CANARY_TOKEN_FILE`, else `records/canary.token` under the current
directory). `--public-reads` opens /rollouts and /reports (never commands) without it.

`canary run` saves each rollout's status next to its record (`<record_dir>/<name>.status.json`)
and, when restarted after SIGTERM or a crash, resumes an unfinished rollout at the same step
(`--fresh` starts over instead).

Exit status of `canary run`: 0 every rollout promoted, 1 any rolled back or aborted,
2 bad config or arguments, 3 stopped (SIGTERM/SIGINT) before the end. The manual commands:
0 accepted, 1 refused by the rollout, 2 bad arguments, 3 server unreachable, 4 unknown rollout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import importlib
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from canary.cli.common import (
    DEFAULT_LISTEN,
    EXIT_BAD_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_STOPPED,
    EXIT_UNKNOWN,
    SERVER_ENV,
    TARGET_RULE,
    TOKEN_FILE_ENV,
    add_log_format,
    client_token,
    parse_listen,
    say,
    server_token,
    server_url,
    target_mode,
    token_hint,
)
from canary.cli.status import EXIT_CODES_HELP, add_status_flags
from canary.core.logs import configure_logging
from canary.httpio import AnswerTooLarge, read_bounded
from canary.runtime import trimmed, tune_gc, tune_malloc, tune_tls_reads

__all__ = ["build_parser", "main"]

# name -> (module, function, help): the module's function gets the raw remaining argv.
FORWARDED: dict[str, tuple[str, str, str]] = {
    "demo": (
        "canary.demo",
        "main",
        "run a whole rollout on this machine (see `canary demo --help`)",
    ),
}
MANUAL = ("promote", "abort", "pause", "resume")

log = logging.getLogger("canary.cli.main")

# The controller's answers (a rollout's status, a command's result): far below this.
MAX_ANSWER_BYTES = 64 * 1024 * 1024
Handler = Callable[[argparse.Namespace], int]


# ---- run ----------------------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    from canary.static.config import ConfigError, TargetConfig, load_config
    from canary.static.targets import BadTarget

    configs: list[TargetConfig] = []
    try:
        for path in args.config:
            configs.append(load_config(path))
        names = [c.name for c in configs]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate is not None:
            raise ConfigError(f"two config files name the target {duplicate!r}")
        host, port = parse_listen(args.listen)
    except (ConfigError, ValueError) as exc:
        say(f"canary run: error: {exc}", level=logging.ERROR)
        return EXIT_BAD_CONFIG
    try:
        token_file, token = server_token(args.token_file, Path(configs[0].record_dir))
    except ValueError as exc:
        say(f"canary run: error: {exc}", level=logging.ERROR)
        return EXIT_BAD_CONFIG
    say(f"canary: commands need the bearer token in {token_file}", token_file=str(token_file))
    tune_gc()  # a long-running process (canary.runtime)
    tune_malloc()  # before any thread: one arena for them all (canary.runtime)
    tune_tls_reads()  # its connections' read buffers (canary.runtime)
    try:
        return asyncio.run(
            trimmed(  # free memory back to the system (canary.runtime)
                _run(
                    configs,
                    host,
                    port,
                    fresh=args.fresh,
                    linger_s=args.linger,
                    token=token,
                    public_reads=args.public_reads,
                    allow_webhook_hosts=tuple(args.allow_webhook_host or ()),
                )
            )
        )
    except BadTarget as exc:
        say(f"canary run: error: {exc}", level=logging.ERROR)
        return EXIT_BAD_CONFIG


def _report_routes(record_dir: Path) -> list[Callable[[Any], None]]:
    """canary.reports.pages' /reports/ routes and the live view at /."""
    from canary.reports.pages import register_routes
    from canary.server.live import register_live

    return [lambda app: register_routes(app, record_dir=record_dir), register_live]


async def _run(
    configs: Sequence[Any],
    host: str,
    port: int,
    *,
    fresh: bool = False,
    linger_s: float = 0.0,
    token: str,
    public_reads: bool = False,
    allow_webhook_hosts: Sequence[str] = (),
) -> int:
    from canary.notify.webhooks import Notifier
    from canary.runner import Controller, ResumeError, StateLocked, run_until_signalled
    from canary.server.app import Server, make_app
    from canary.server.auth import TokenAccess
    from canary.static.targets import BadTarget, build_runner

    allow = tuple(allow_webhook_hosts)
    runners = [build_runner(config, fresh=fresh, allow_webhook_hosts=allow) for config in configs]
    # Refuse before anything moves: another controller holds a rollout, or a saved one
    # cannot be read back (never a silent new rollout).
    try:
        for runner in runners:
            await runner.prepare()
    except (StateLocked, ResumeError) as exc:
        for runner in runners:
            if runner.store is not None:
                await runner.store.release()
        raise BadTarget(str(exc)) from None
    # One notifier per target: each config names its own webhooks.
    notifiers: list[Notifier] = []
    for runner, config in zip(runners, configs, strict=True):
        if config.notifications:
            notifiers.append(Notifier(config.notifications, allow_hosts=allow_webhook_hosts))
            runner.entry_observers.append(notifiers[-1].on_entry)
    controller = Controller(runners)
    app = make_app(
        controller,
        access=TokenAccess(token),
        public_reads=public_reads,
        extensions=_report_routes(Path(configs[0].record_dir)),
    )
    server = Server(app, host=host, port=port)
    try:
        await server.start()
    except OSError as exc:
        raise BadTarget(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        say(f"canary: serving on {server.url}", url=server.url)
        say(f"canary: live view: {server.url}/", url=f"{server.url}/")
        statuses = await run_until_signalled(controller)
        if linger_s > 0 and not any(runner.stopped for runner in runners):
            await _linger(linger_s)
    finally:
        await server.stop()
        for notifier in notifiers:  # the last promotion/rollback gets a moment to go out
            await notifier.aclose(grace_s=5.0)
    for runner in runners:
        status = statuses[runner.name]
        state = "stopped" if runner.stopped else status.outcome or status.phase.value
        say(f"canary: {runner.name}: {state}: {status.message}", rollout=runner.name, outcome=state)
        say(
            f"canary: {runner.name}: record {runner.record_path}",
            rollout=runner.name,
            record=str(runner.record_path),
        )
    if any(runner.stopped for runner in runners):
        return EXIT_STOPPED
    if all(status.outcome == "promoted" for status in statuses.values()):
        return EXIT_OK
    return EXIT_FAILED


async def _linger(seconds: float) -> None:
    """Keep serving the final states a while (for `canary status --wait`); SIGTERM/SIGINT
    cut it short."""
    loop = asyncio.get_running_loop()
    cut = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, cut.set)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(cut.wait(), seconds)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def _cmd_validate(args: argparse.Namespace) -> int:
    from canary.static.config import ConfigError, load_config

    code = EXIT_OK
    for path in args.config:
        try:
            config = load_config(path)
        except ConfigError as exc:
            print(str(exc), file=sys.stderr)
            code = EXIT_BAD_CONFIG
            continue
        print(json.dumps({"file": str(path), **config.model_dump(mode="json")}, indent=2))
    return code


# ---- manual commands and status, through the server or a cluster --------------------------


def _cluster(args: argparse.Namespace) -> bool:
    """Decide the target once; the why is kept on args for error messages."""
    mode, why, by_default = target_mode(args)
    args.target_why = why if by_default else None
    return mode == "cluster"


async def _http(
    method: str, url: str, body: dict[str, str] | None, token: str | None = None
) -> tuple[int, Any]:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=30)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.request(method, url, json=body, headers=headers) as response,
    ):
        try:
            text = (await read_bounded(response, MAX_ANSWER_BYTES)).decode("utf-8", "replace")
        except AnswerTooLarge as exc:
            return response.status, {"error": f"the controller's answer is over {exc.limit} bytes"}
        try:
            return response.status, json.loads(text)
        except json.JSONDecodeError:
            return response.status, {"error": text.strip()}


def _request(
    args: argparse.Namespace, method: str, path: str, body: dict[str, str] | None
) -> tuple[int, Any] | None:
    import aiohttp

    url = server_url(args) + path
    token = client_token(args)
    try:
        return asyncio.run(_http(method, url, body, token))
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        why = getattr(args, "target_why", None)
        hint = (
            f"; a `canary run` server was tried because {why}: for a cluster give "
            "--kubeconfig, --context or -n"
            if why
            else ""
        )
        print(
            f"canary {args.command}: error: cannot reach the controller at {server_url(args)}: "
            f"{exc or type(exc).__name__} (is `canary run` running? see --server){hint}",
            file=sys.stderr,
        )
        return None


def _chosen(args: argparse.Namespace) -> bool | None:
    """True for a cluster, False for the server, None (after saying why) for a conflict."""
    try:
        return _cluster(args)
    except ValueError as exc:
        print(f"canary {args.command}: error: {exc}", file=sys.stderr)
        return None


def _cmd_manual(args: argparse.Namespace) -> int:
    cluster = _chosen(args)
    if cluster is None:
        return EXIT_BAD_CONFIG
    if cluster:
        from canary.cli import kubernetes

        return kubernetes.manual_command(args)
    if not args.name:
        print(f"canary {args.command}: error: NAME must not be empty", file=sys.stderr)
        return EXIT_BAD_CONFIG
    answer = _request(
        args,
        "POST",
        f"/rollouts/{quote(args.name, safe='/')}/{args.command}",
        {"who": args.who, "reason": args.reason},
    )
    if answer is None:
        return EXIT_STOPPED
    status, data = answer
    if status == 200:
        print(f"{args.name}: {args.command} accepted; now {data.get('phase')}")
        return EXIT_OK
    message = data.get("message") or data.get("error") or f"HTTP {status}"
    print(
        f"canary {args.command}: {args.name}: {message}{token_hint(args, status)}", file=sys.stderr
    )
    if status == 404:
        return EXIT_UNKNOWN
    if status == 409:
        return EXIT_FAILED
    return EXIT_BAD_CONFIG


def _cmd_status(args: argparse.Namespace) -> int:
    cluster = _chosen(args)
    if cluster is None:
        return EXIT_BAD_CONFIG
    if cluster:
        from canary.cli import kubernetes

        return kubernetes.status(args)
    from canary.cli.status import Row, from_server, show

    def fetch() -> list[Row] | int:
        path = f"/rollouts/{quote(args.name, safe='/')}" if args.name else "/rollouts"
        answer = _request(args, "GET", path, None)
        if answer is None:
            return EXIT_STOPPED
        status, data = answer
        if status == 404:
            print(f"canary status: {data.get('error')}", file=sys.stderr)
            return EXIT_UNKNOWN
        if status != 200:
            print(
                f"canary status: HTTP {status}: {data}{token_hint(args, status)}", file=sys.stderr
            )
            return EXIT_FAILED
        return [from_server(s) for s in (data["rollouts"] if "rollouts" in data else [data])]

    return show(args, fetch)


# ---- the parser ----------------------------------------------------------------------------


def _add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "cluster (instead of --server; as kubectl's flags)",
        "Any of these means a cluster. With none of them and no --server: a cluster when "
        "$KUBECONFIG is set, ~/.kube/config exists or in a pod, else the `canary run` server.",
    )
    group.add_argument(
        "--kubeconfig", metavar="FILE", help="kubeconfig file (default $KUBECONFIG, ~/.kube/config)"
    )
    group.add_argument("--context", help="kubeconfig context")
    group.add_argument("-n", "--namespace", help="namespace of the Deployment")


def _add_server_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        metavar="URL",
        help=f"a running `canary run` (default ${SERVER_ENV}, else http://{DEFAULT_LISTEN} "
        "when no kubeconfig is found)",
    )
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        help=f"the server's bearer token (default ${TOKEN_FILE_ENV}, else records/canary.token)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="canary",
        description="Traffic-splitting canary controller with anytime-valid analysis.",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="default: info",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = subparsers.add_parser(
        "run",
        help="roll out static targets described by config files",
        description="Roll out each target described by a config file, one task each, until "
        "every rollout is promoted or rolled back. A rollout left unfinished by an earlier "
        "run (SIGTERM, crash) is resumed at its step. Exit 0 promoted, 1 rolled back, 2 bad "
        "config, 3 stopped by SIGTERM/SIGINT.",
    )
    run.add_argument(
        "--config", metavar="FILE", action="append", required=True, help="YAML file; repeatable"
    )
    run.add_argument(
        "--listen",
        metavar="HOST:PORT",
        default=DEFAULT_LISTEN,
        help=f"HTTP server for probes, /metrics, /rollouts and commands (default {DEFAULT_LISTEN})",
    )
    run.add_argument(
        "--fresh",
        action="store_true",
        help="start new rollouts even where an unfinished one was saved (default: resume it)",
    )
    run.add_argument(
        "--linger",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="once every rollout has ended, keep serving their final states this long, so "
        "that `canary status NAME --wait` sees the outcome (default 0)",
    )
    run.add_argument(
        "--token-file",
        metavar="FILE",
        help="the bearer token that commands (and reads) need (default: <record_dir>/"
        "canary.token of the first config, created with mode 0600 when missing)",
    )
    run.add_argument(
        "--public-reads",
        action="store_true",
        help="serve /rollouts and /reports without the token (commands always need it)",
    )
    run.add_argument(
        "--allow-webhook-host",
        metavar="HOST",
        action="append",
        help="a webhook host that may be loopback, link-local or the API server (repeatable)",
    )
    add_log_format(run)
    run.set_defaults(func=_cmd_run)

    validate = subparsers.add_parser(
        "validate",
        help="check config files without running anything",
        description="Load and validate config files; print each target's effective settings "
        "as JSON. Exit 0 when all are valid, 2 otherwise (every problem is listed).",
    )
    validate.add_argument("config", metavar="FILE", nargs="+")
    validate.set_defaults(func=_cmd_validate)

    for verb in MANUAL:
        manual = subparsers.add_parser(
            verb,
            help=f"{verb} a rollout",
            description=f"{verb.capitalize()} a rollout by name. {TARGET_RULE}",
        )
        manual.add_argument("name", metavar="NAME")
        manual.add_argument("--reason", default="", help="why (kept in the record)")
        manual.add_argument("--who", default=_user(), help="who (default: the current user)")
        _add_server_flag(manual)
        _add_cluster_flags(manual)
        manual.set_defaults(func=_cmd_manual)

    status = subparsers.add_parser(
        "status",
        help="show rollouts",
        description=f"Show rollouts. {TARGET_RULE} In a cluster the namespace is -n, else "
        f"the current kubeconfig context's (as kubectl), else default. {EXIT_CODES_HELP}",
    )
    status.add_argument("name", metavar="NAME", nargs="?")
    add_status_flags(status)
    _add_server_flag(status)
    _add_cluster_flags(status)
    status.add_argument(
        "-A",
        "--all-namespaces",
        action="store_true",
        help="a cluster's rollouts in every namespace",
    )
    status.set_defaults(func=_cmd_status)

    for name, (_, _, text) in FORWARDED.items():
        subparsers.add_parser(name, help=text, add_help=False)

    # Imported here, not at the top: `canary demo`, forwarded before any parser is built, does
    # not pay for the Kubernetes client.
    from canary.cli import clusters, kubernetes, loadtest, report

    report.add_parser(subparsers)
    kubernetes.add_parser(subparsers)
    clusters.add_parser(subparsers)
    loadtest.add_parser(subparsers)
    return parser


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "cli"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `canary` console script and `python -m canary`."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments and arguments[0] in FORWARDED:
        module_name, function, _ = FORWARDED[arguments[0]]
        forward = getattr(importlib.import_module(module_name), function)
        return int(forward(arguments[1:]))
    parser = build_parser()
    args = parser.parse_args(arguments)
    # Text or JSON lines; secrets redacted either way (canary.core.logs).
    configure_logging(args.log_level, getattr(args, "log_format", "text"))
    handler: Handler = args.func
    return int(handler(args))
