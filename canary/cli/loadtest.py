"""`canary loadtest`: the load tester that rollout webhooks call (canary.loadtest).

Exit status: 0 stopped by SIGTERM/SIGINT (every job cancelled and awaited), 2 bad flags.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from canary.cli.common import EXIT_BAD_CONFIG, EXIT_OK, add_log_format, parse_listen

__all__ = ["DEFAULT_LOADTEST_LISTEN", "add_parser", "run"]

DEFAULT_LOADTEST_LISTEN = "127.0.0.1:8080"  # in a pod: --listen 0.0.0.0:8080

_DESCRIPTION = """\
Serve generated load for low-traffic canaries. A rollout webhook POSTs a Flagger-style
payload {"name","namespace","type","metadata":{"url","rps","duration","method"}} to / every
tick; the load tester then sends `rps` requests per second (open loop: a slow canary does not
lower the rate) to `url` for `duration` (30s, 1m, 1m30s). A repeated call for the same
namespace, name and url extends the running job, never stacks a second one; a post-rollout
hook stops it. Bad metadata gets a 4xx whose body names the key. GET /jobs lists the jobs,
GET /metrics exports counts by outcome. Only URLs whose host matches an allowed pattern
(default: *.svc and *.svc.cluster.local, plus --allow-host) or lies in an --allow-cidr are
accepted; redirects are not followed.
"""


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Register `canary loadtest` on the main CLI's subparsers."""
    parser = subparsers.add_parser(
        "loadtest",
        help="serve generated load for low-traffic canaries, driven by rollout webhooks",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--listen",
        default=DEFAULT_LOADTEST_LISTEN,
        metavar="HOST:PORT",
        help=f"where to serve (default: {DEFAULT_LOADTEST_LISTEN})",
    )
    parser.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="PATTERN",
        help="also allow URLs to hosts matching this name pattern (e.g. *.shop.example or "
        "app.internal); an exact name is trusted at any address. Repeatable",
    )
    parser.add_argument(
        "--allow-cidr",
        action="append",
        default=[],
        metavar="CIDR",
        help="also allow IP addresses in this network (e.g. 10.96.0.0/12); names that "
        "resolve to loopback or link-local addresses need it too. Repeatable",
    )
    parser.add_argument(
        "--max-rps", type=float, default=200.0, help="most requests/s one job may ask for (200)"
    )
    parser.add_argument(
        "--max-duration",
        default="1h",
        metavar="DURATION",
        help="longest duration one call may ask for (1h)",
    )
    parser.add_argument(
        "--max-jobs", type=int, default=32, help="most jobs running at once; more get 429 (32)"
    )
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=256,
        help="most requests in flight per job; beyond it a request is dropped and counted (256)",
    )
    parser.add_argument(
        "--timeout", default="5s", metavar="DURATION", help="per-request timeout (5s)"
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        help="require `Authorization: Bearer <token>` on POST / with the token in this file",
    )
    add_log_format(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from canary.loadtest import Limits, TargetPolicy, parse_duration, serve

    try:
        host, port = parse_listen(args.listen)
        try:
            max_duration_s = parse_duration(args.max_duration)
        except ValueError as exc:
            raise ValueError(f"--max-duration: {exc}") from None
        try:
            timeout_s = parse_duration(args.timeout)
        except ValueError as exc:
            raise ValueError(f"--timeout: {exc}") from None
        limits = Limits(
            max_rps=args.max_rps,
            max_duration_s=max_duration_s,
            max_jobs=args.max_jobs,
            timeout_s=timeout_s,
            max_in_flight=args.max_in_flight,
        )
        policy = TargetPolicy.with_defaults(hosts=args.allow_host, cidrs=args.allow_cidr)
        token = None
        if args.token_file is not None:
            try:
                token = args.token_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(
                    f"--token-file: cannot read {args.token_file}: {exc.strerror}"
                ) from None
            if not token:
                raise ValueError(f"--token-file: {args.token_file} is empty")
    except ValueError as exc:
        print(f"canary loadtest: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    asyncio.run(serve(host=host, port=port, limits=limits, policy=policy, token=token))
    return EXIT_OK
