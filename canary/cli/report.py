"""`canary report NAME|RECORD`: render a rollout's report from its record, to a file or stdout.

The record is found by canary.reports.pages (a record file, or the newest record of a target,
rollout id or report id in the record directory), or, with any of -n/--kubeconfig/--context,
read from its ConfigMap in a cluster: by rollout id, or through an annotated Deployment's
status (canary.kubernetes.commands.fetch_record). Exit 0 on success, 1 with a one-line error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from canary.core.records import NoteEntry, RecordError
from canary.kubernetes.record_store import (
    GAP_NOTE_END,
    load_record_configmap,
    read_record_configmap,
)
from canary.notify.webhooks import report_id
from canary.reports import Report, ReportError, build_report
from canary.reports.pages import FORMATS, Format, load_report, render, resolve_record

__all__ = ["DEFAULT_RECORD_DIR", "add_parser", "main", "run"]

_SUFFIX: dict[Format, str] = {"html": ".html", "md": ".md", "json": ".report.json"}
# The config's default (canary/config.py: record_dir), overridable for the CLI by env.
DEFAULT_RECORD_DIR = Path(os.environ.get("CANARY_RECORD_DIR", "records"))


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Register `canary report` on the main CLI's subparsers."""
    parser = subparsers.add_parser(
        "report",
        help="render the analysis report of a rollout",
        description="Render a rollout's analysis report from its record. NAME is a target "
        "(its newest rollout), a rollout id or a report id; RECORD is a record file.",
    )
    _arguments(parser)
    parser.set_defaults(func=run)
    return parser


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME|RECORD", help="target name or record file")
    parser.add_argument("--format", choices=FORMATS, default="html", help="default: html")
    parser.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="where to write; '-' for stdout (default: next to the record)",
    )
    parser.add_argument(
        "--record-dir",
        type=Path,
        default=DEFAULT_RECORD_DIR,
        help=f"where records are (default: {DEFAULT_RECORD_DIR}, or $CANARY_RECORD_DIR)",
    )
    cluster = parser.add_argument_group(
        "in a cluster", "read the record of rollout NAME (its id) from its ConfigMap"
    )
    cluster.add_argument("-n", "--namespace", help="namespace of the record ConfigMaps")
    cluster.add_argument("--kubeconfig", metavar="FILE", help="kubeconfig file")
    cluster.add_argument("--context", help="kubeconfig context")


def run(args: argparse.Namespace) -> int:
    """`canary report`: 0 on success, 1 with a one-line error otherwise."""
    fmt: Format = args.format
    in_cluster = any(getattr(args, k, None) for k in ("namespace", "kubeconfig", "context"))
    try:
        if in_cluster:
            report = asyncio.run(_cluster_report(args))
            path = Path.cwd() / f"{report_id(report.rollout)}.jsonl"  # output goes here
        else:
            path = resolve_record(args.name, record_dir=args.record_dir)
            report = load_report(path)
        text = render(report, fmt)
    except ReportError as exc:
        print(f"canary report: error: {exc}", file=sys.stderr)
        return 1
    if report.incomplete_reason:
        print(f"canary report: warning: {report.incomplete_reason}", file=sys.stderr)
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    out = Path(args.output) if args.output else _next_to(path, fmt)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        print(f"canary report: error: cannot write {out}: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


async def _cluster_report(args: argparse.Namespace) -> Report:
    from canary.kubernetes.client import Kube  # only cluster users pay for the client

    namespace = args.namespace or "canary-system"
    try:
        kube = await Kube.connect(kubeconfig=args.kubeconfig, context=args.context)
    except Exception as exc:  # kubeconfig problems come in many types; all are the user's
        raise ReportError(f"cannot use the cluster's kubeconfig: {exc}") from None
    try:
        entries = await load_record_configmap(
            kube, namespace=namespace, rollout=args.name, gaps=True
        )
    except RecordError as exc:
        if "@" in args.name:
            raise ReportError(str(exc)) from None
        # NAME may be an annotated Deployment in -n: its status names its latest record.
        from canary.kubernetes.client import KubeError
        from canary.kubernetes.commands import fetch_record

        try:
            entries = await read_record_configmap(
                kube, await fetch_record(kube, namespace, args.name), gaps=True
            )
        except (KubeError, RecordError) as second:
            raise ReportError(f"{exc}; nor is it a Deployment with a record: {second}") from None
    finally:
        await kube.close()
    for entry in entries:  # said where a user reading only the terminal sees it
        if isinstance(entry, NoteEntry) and entry.message.endswith(GAP_NOTE_END):
            print(f"warning: {entry.message}", file=sys.stderr)
    dicts = [entry.model_dump(mode="json", by_alias=True) for entry in entries]
    return build_report(dicts)


def _next_to(record: Path, fmt: Format) -> Path:
    return record.with_name(record.name.removesuffix(".jsonl") + _SUFFIX[fmt])


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m canary.cli.report ...`: the same as `canary report ...`."""
    parser = argparse.ArgumentParser(prog="canary report")
    _arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover - `canary report` is the usual way in
    sys.exit(main())
