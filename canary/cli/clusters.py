"""`canary clusters`, `canary failover` and `canary failback`: two clusters from the command line.

`canary clusters --topology FILE` connects to both clusters, wires every service of the
topology (canary.clusters.multicluster.build_controller: rollouts across the clusters by DNS
weight, failover beside them) and serves it over HTTP, with the /failover routes and the
/reports/ pages, until SIGTERM/SIGINT. `canary failover` / `canary failback` drive a running
`canary clusters` over HTTP (`/failover`): idempotent, refused when the target is unhealthy
unless forced, recorded with who and why.

As with `canary run`, every route but the probes and /metrics needs the bearer token in
`--token-file` (default `<record_dir>/canary.token`, created with mode 0600 when missing);
`canary failover|failback` send it from `--token-file`, `$CANARY_TOKEN_FILE` or
records/canary.token.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import getpass
import json
import logging
import os
import signal
import sys
from typing import Any

import aiohttp

from canary.cli.common import (
    DEFAULT_LISTEN,
    EXIT_BAD_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_STOPPED,
    EXIT_UNKNOWN,
    SERVER_ENV,
    TOKEN_FILE_ENV,
    add_log_format,
    client_token,
    parse_listen,
    say,
    server_token,
    server_url,
    token_hint,
)
from canary.clusters.multicluster import build_controller, failover_routes
from canary.clusters.topology import PowerDNSRouterConfig, Topology, load_topology
from canary.httpio import AnswerTooLarge, read_bounded
from canary.kubernetes.client import Kube, KubeError
from canary.reports.pages import register_routes
from canary.runtime import trimmed, tune_gc, tune_malloc, tune_tls_reads
from canary.server.app import Server, make_app
from canary.server.auth import TokenAccess
from canary.server.live import register_live
from canary.static.config import ConfigError

__all__ = ["add_parser", "serve_topology"]

MAX_ANSWER_BYTES = 64 * 1024 * 1024  # the controller's answers are far below this

JSON = dict[str, Any]


def _user() -> str:
    try:
        return os.environ.get("USER") or getpass.getuser()
    except (KeyError, OSError):
        return "cli"


async def _post(url: str, body: JSON | None, token: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
        session.request(
            "POST" if body is not None else "GET", url, json=body, headers=headers
        ) as response,
    ):
        try:
            text = (await read_bounded(response, MAX_ANSWER_BYTES)).decode("utf-8", "replace")
        except AnswerTooLarge as exc:
            return response.status, {"error": f"the controller's answer is over {exc.limit} bytes"}
        try:
            return response.status, json.loads(text)
        except json.JSONDecodeError:
            return response.status, {"error": text.strip()}


def _cmd_move(args: argparse.Namespace) -> int:
    base = server_url(args)
    if args.command == "failover" and args.status:
        url, body = f"{base}/failover", None
    else:
        to = args.to if args.command == "failover" else "primary"
        if to is None:
            print("canary failover: error: --to standby|primary is required", file=sys.stderr)
            return EXIT_BAD_CONFIG
        url = f"{base}/failover" + (f"/{args.service}" if args.service else "")
        body = {"to": to, "who": args.who, "reason": args.reason, "force": args.force}
    try:
        status, data = asyncio.run(_post(url, body, client_token(args)))
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        print(
            f"canary {args.command}: error: cannot reach the controller at {base}: "
            f"{exc or type(exc).__name__} (is `canary clusters` running? see --server)",
            file=sys.stderr,
        )
        return EXIT_STOPPED
    if status == 404:
        print(f"canary {args.command}: {data.get('error')}", file=sys.stderr)
        return EXIT_UNKNOWN
    if status not in (200, 409):
        print(
            f"canary {args.command}: error: {data.get('error', status)}{token_hint(args, status)}",
            file=sys.stderr,
        )
        return EXIT_BAD_CONFIG
    for service in data.get("services", []):
        state = service.get("failover", {})
        line = f"{service['name']}: on {state.get('mode')}"
        if state.get("pinned_by"):
            line += f" (pinned by {state['pinned_by']})"
        elif state.get("changed_by"):
            line += f" (last moved by {state['changed_by']})"
        if "accepted" in service:
            verdict = "done" if service["accepted"] else "REFUSED"
            line += f"; {verdict}: {service.get('message', '')}"
        stream = sys.stdout if service.get("accepted", True) else sys.stderr
        print(line, file=stream)
    return EXIT_OK if status == 200 else EXIT_FAILED


def _cmd_clusters(args: argparse.Namespace) -> int:
    try:
        topology = load_topology(args.topology)
        host, port = parse_listen(args.listen)
        token_file, token = server_token(args.token_file, topology.record_dir)
        for service in topology.services:
            if isinstance(service.router, PowerDNSRouterConfig):
                service.router.api_key()
    except (ConfigError, ValueError) as exc:
        say(f"canary clusters: error: {exc}", level=logging.ERROR)
        return EXIT_BAD_CONFIG
    say(f"canary: commands need the bearer token in {token_file}", token_file=str(token_file))
    tune_gc()  # a long-running process (canary.runtime)
    tune_malloc()  # before any thread: one arena for them all (canary.runtime)
    tune_tls_reads()  # many API connections, each with a read buffer (canary.runtime)
    try:
        asyncio.run(
            trimmed(  # free memory back to the system (canary.runtime)
                serve_topology(
                    topology,
                    host=host,
                    port=port,
                    token=token,
                    allow_webhook_hosts=tuple(args.allow_webhook_host or ()),
                )
            )
        )
    except KubeError as exc:
        say(f"canary clusters: error: {exc}", level=logging.ERROR)
        return EXIT_BAD_CONFIG
    return EXIT_STOPPED


async def serve_topology(
    topology: Topology,
    *,
    host: str,
    port: int,
    token: str,
    allow_webhook_hosts: tuple[str, ...] = (),
) -> None:
    """Connect to both clusters, run every service, serve HTTP, until SIGTERM/SIGINT."""
    clusters = topology.clusters
    primary = await Kube.connect(
        kubeconfig=None
        if clusters.primary.kubeconfig is None
        else str(clusters.primary.kubeconfig),
        context=clusters.primary.context,
    )
    canary = await Kube.connect(
        kubeconfig=None if clusters.canary.kubeconfig is None else str(clusters.canary.kubeconfig),
        context=clusters.canary.context,
    )
    try:
        async with aiohttp.ClientSession() as session:
            controller = build_controller(
                topology,
                session,
                primary=primary,
                canary=canary,
                allow_webhook_hosts=allow_webhook_hosts,
            )
            reports = functools.partial(register_routes, record_dir=topology.record_dir)
            app = make_app(
                controller,
                access=TokenAccess(token),
                extensions=[failover_routes(controller), reports, register_live],
            )
            async with Server(app, host=host, port=port) as server:
                say(f"canary: serving on {server.url}", url=server.url)
                say(f"canary: live view: {server.url}/", url=f"{server.url}/")
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, controller.stop)
                try:
                    await controller.run()
                finally:
                    for sig in (signal.SIGTERM, signal.SIGINT):
                        loop.remove_signal_handler(sig)
    finally:
        await primary.close()
        await canary.close()


def add_parser(subparsers: Any) -> None:
    """Register `canary clusters`, `canary failover` and `canary failback` on the main CLI."""
    run = subparsers.add_parser(
        "clusters",
        help="run two-cluster rollouts and failover from a topology file",
        description="Watch each service's Deployment in the canary cluster, roll new templates "
        "out across the two clusters by DNS weight, and fail over to the canary cluster when "
        "the primary is down. Runs until SIGTERM/SIGINT.",
    )
    run.add_argument("--topology", metavar="FILE", required=True, help="the topology YAML")
    run.add_argument("--listen", metavar="HOST:PORT", default=DEFAULT_LISTEN)
    run.add_argument(
        "--token-file",
        metavar="FILE",
        help="the bearer token the routes need (default <record_dir>/canary.token, created)",
    )
    run.add_argument(
        "--allow-webhook-host",
        metavar="HOST",
        action="append",
        help="a webhook host that may be loopback, link-local or the API server (repeatable)",
    )
    add_log_format(run)
    run.set_defaults(func=_cmd_clusters)

    for verb in ("failover", "failback"):
        text = (
            "move all traffic to the standby (or back with --to primary)"
            if verb == "failover"
            else "move traffic back to the primary: steady-state weights"
        )
        parser = subparsers.add_parser(
            verb,
            help=text,
            description=f"{text[0].upper()}{text[1:]}. Idempotent; refused (exit 1, with the "
            "reason) when the target is unhealthy unless --force. Recorded with who and why.",
        )
        if verb == "failover":
            parser.add_argument("--to", choices=("standby", "primary"), help="where traffic goes")
            parser.add_argument("--status", action="store_true", help="only show the state")
        parser.add_argument("--reason", default="", help="why (kept in the record and Events)")
        parser.add_argument("--force", action="store_true", help="even to an unhealthy target")
        parser.add_argument("--as", dest="who", default=_user(), help="who (default: $USER)")
        parser.add_argument("--service", metavar="NAME", help="one service (default: all)")
        parser.add_argument(
            "--server",
            metavar="URL",
            help=f"a running `canary clusters` (default ${SERVER_ENV} or http://{DEFAULT_LISTEN})",
        )
        parser.add_argument(
            "--token-file",
            metavar="FILE",
            help=f"the server's bearer token (default ${TOKEN_FILE_ENV}, else records/canary.token)",
        )
        parser.set_defaults(func=_cmd_move)
