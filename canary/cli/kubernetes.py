"""`canary` against a cluster: the `kubernetes` subcommand, and status and manual commands.

Why these live apart from main.py: they need the Kubernetes client, which the static-target
commands do not. main.py registers `canary kubernetes` here (`add_parser`) and sends status
and the manual commands here (`status`, `manual_command`) when the target is a cluster.

- `canary kubernetes [--kubeconfig F] [--context C] [--namespace NS | --all-namespaces]
  [--leader-elect | --shards N] [--lease-name N --lease-namespace NS --lease-duration S]
  [--listen HOST:PORT]
  --prometheus-url URL [--record-namespace NS] [--public-reads] [--allow-webhook-host H]`
  runs the reconciler (canary.kubernetes.operator) with the HTTP server (/healthz, /readyz,
  /metrics, /rollouts, commands) until SIGTERM/SIGINT. Every route but the probes and
  /metrics needs a bearer token of the cluster, checked by TokenReview and
  SubjectAccessReview (canary.kubernetes.access): `patch deployments` for a command, `get`
  for a read. /readyz is 200 only on the leader, the one replica with rollouts to show.
- `canary status [-n NS | -A] [NAME] [-o ...] [-w] [--wait ...]` reads the status annotations
  (drawn by canary.cli.status); without -n, the kubeconfig context's namespace, as kubectl.
- `canary promote|abort|pause|resume NAME [-n NS]` writes the `canary.dev/command`
  annotation (never the spec, so GitOps tools do not revert it) and waits for the
  controller's answer in the status (canary.kubernetes.commands.send_command).

main.py sends status and the manual commands here by kubectl's rule (canary.cli.common.target_mode);
when no flag chose the cluster, a failure says what did (`args.target_why`).

Exit statuses follow main.py: 0 ok/accepted, 1 refused, 2 bad arguments or kubeconfig,
3 no answer from the controller (or the cluster unreachable), 4 no such Deployment.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import signal
import sys
from typing import Any

from canary.cli.common import EXIT_BAD_CONFIG as EXIT_BAD
from canary.cli.common import EXIT_OK, EXIT_UNKNOWN, add_log_format, parse_listen, say
from canary.cli.common import EXIT_STOPPED as EXIT_NO_ANSWER  # the controller did not answer
from canary.cli.status import Row, show
from canary.kubernetes.client import Kube, KubeError, NotFound
from canary.kubernetes.commands import ACCEPTED, DEFAULT_WAIT_S, UNKNOWN, send_command
from canary.kubernetes.operator import ENABLED, KubeState
from canary.kubernetes.spec import ANNOTATION_SPEC_ERROR, ANNOTATION_STATUS, PREFIX, CanarySpec
from canary.runtime import trimmed, tune_gc, tune_malloc, tune_tls_reads

__all__ = ["add_parser", "context_namespace", "manual_command", "run_kubernetes", "status"]

log = logging.getLogger("canary.cli.kubernetes")


SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def context_namespace(
    kubeconfig: str | None, context: str | None, environ: dict[str, str] | None = None
) -> str | None:
    """The namespace kubectl would use without -n: the kubeconfig context's (`--context`, else
    current-context; the file is --kubeconfig, else the first of $KUBECONFIG that has the
    context, else ~/.kube/config), else in a pod its service account's. None when none says."""
    import yaml

    env = os.environ if environ is None else environ
    if kubeconfig:
        files = [kubeconfig]
    elif env.get("KUBECONFIG"):
        files = [f for f in env["KUBECONFIG"].split(os.pathsep) if f]
    else:
        home = env.get("HOME") or os.path.expanduser("~")
        files = [os.path.join(home, ".kube", "config")]
    configs: list[dict[str, Any]] = []
    for path in files:
        try:
            with open(path, encoding="utf-8") as handle:
                loaded = yaml.safe_load(handle)
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(loaded, dict):
            configs.append(loaded)
    name = context or next(
        (c["current-context"] for c in configs if c.get("current-context")), None
    )
    if name:
        for config in configs:
            for entry in config.get("contexts") or []:
                if isinstance(entry, dict) and entry.get("name") == name:
                    namespace = (entry.get("context") or {}).get("namespace")
                    return str(namespace) if namespace else None
    if not configs and not kubeconfig and env.get("KUBERNETES_SERVICE_HOST"):
        try:
            with open(SERVICE_ACCOUNT_NAMESPACE, encoding="utf-8") as handle:
                return handle.read().strip() or None
        except OSError:
            return None
    return None


def _namespace(args: argparse.Namespace) -> str:
    """-n, else the kubeconfig context's namespace (as kubectl), else default."""
    given = getattr(args, "namespace", None)
    if given:
        return str(given)
    found = context_namespace(getattr(args, "kubeconfig", None), getattr(args, "context", None))
    return found or "default"


async def _connect(args: argparse.Namespace) -> Kube:
    return await Kube.connect(
        kubeconfig=getattr(args, "kubeconfig", None), context=getattr(args, "context", None)
    )


def _fail(command: str, message: str, code: int) -> int:
    say(f"canary {command}: error: {message}", level=logging.ERROR)
    return code


def _why_cluster(args: argparse.Namespace) -> str:
    """When no flag chose the cluster (canary.cli.common.target_mode), say what did."""
    why = getattr(args, "target_why", None)
    if not why:
        return ""
    return f" (a cluster was tried because {why}; for a `canary run` server give --server URL)"


# ---- status ------------------------------------------------------------------------------


async def _fetch(args: argparse.Namespace) -> list[dict[str, Any]] | int:
    all_namespaces = getattr(args, "all_namespaces", False)
    namespace = None if all_namespaces else _namespace(args)
    async with await _connect(args) as kube:
        if args.name:
            if namespace is None:
                return _fail("status", "NAME needs a namespace: give -n, not -A", EXIT_BAD)
            try:
                return [await kube.get_deployment(namespace, args.name)]
            except NotFound:
                return _fail(
                    "status",
                    f"no Deployment {namespace}/{args.name}{_why_cluster(args)}",
                    EXIT_UNKNOWN,
                )
        listed = await kube.list_deployments(namespace)
        return [o for o in listed.objects if ENABLED in _annotations(o)]


def _steps(annotations: dict[str, str]) -> list[int]:
    """canary.dev/steps (else the default), for "step i/n"; [] when unreadable."""
    text = annotations.get(PREFIX + "steps")
    if not text:
        return list(CanarySpec.model_fields["steps"].default)
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        return []


def _row(obj: dict[str, Any]) -> Row:
    """A Deployment as `canary status` shows it (its status annotation)."""
    meta = obj.get("metadata") or {}
    annotations = _annotations(obj)
    namespace, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
    try:
        raw = _json_view(obj)
    except ValueError:
        raw = {"namespace": namespace, "name": name, "status": None, "spec_error": None}
    row = Row(namespace=namespace, name=name, phase="-", raw=raw)
    if annotations.get(ANNOTATION_SPEC_ERROR):
        row.note = "invalid annotations"
        row.message = annotations[ANNOTATION_SPEC_ERROR]
        return row
    row.steps = _steps(annotations)
    try:
        state = KubeState.from_annotation(annotations.get(ANNOTATION_STATUS))
    except ValueError as exc:
        row.note, row.message = "unreadable status", str(exc)
        return row
    if state is None:
        row.note = "not initialized yet"
        return row
    rollout = state.rollout
    row.rollout_id, row.record = state.rollout_id, state.record
    if rollout is None:
        row.note = f"idle; primary at {state.primary_revision}"
        return row
    row.phase = rollout.phase.value
    row.step, row.weight = rollout.step, rollout.weight
    row.weight_verified = rollout.weight_verified
    # the annotation keeps no read-back of its own: a verified weight is the one read back
    row.weight_read = rollout.weight if rollout.weight_verified else None
    row.last_decision, row.outcome = rollout.last_decision, rollout.outcome
    row.message, row.advice = rollout.message, rollout.advice
    row.gates = dict(rollout.gate_answers)
    row.step_started_at, row.revision = rollout.step_started_at, rollout.revision
    row.metrics = {name: m.model_dump() for name, m in state.metrics.items()}
    if state.record_error:
        row.message += f" [record error: {state.record_error}]"
    return row


def status(args: argparse.Namespace) -> int:
    """`canary status` in cluster mode (canary.cli.status draws it)."""

    def fetch() -> list[Row] | int:
        try:
            got = asyncio.run(_fetch(args))
        except KubeError as exc:
            return _fail("status", f"{exc}{_why_cluster(args)}", EXIT_NO_ANSWER)
        return got if isinstance(got, int) else [_row(o) for o in got]

    return show(args, fetch)


def _annotations(obj: dict[str, Any]) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("annotations") or {})


def _json_view(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    annotations = _annotations(obj)
    raw = annotations.get(ANNOTATION_STATUS)
    return {
        "namespace": meta.get("namespace"),
        "name": meta.get("name"),
        "status": json.loads(raw) if raw else None,
        "spec_error": json.loads(annotations[ANNOTATION_SPEC_ERROR])
        if annotations.get(ANNOTATION_SPEC_ERROR)
        else None,
    }


# ---- manual commands ------------------------------------------------------------------------


def manual_command(args: argparse.Namespace) -> int:
    """`canary promote|abort|pause|resume NAME` in cluster mode."""
    wait = getattr(args, "wait", None) or os.environ.get("CANARY_WAIT") or DEFAULT_WAIT_S
    try:
        wait_s = float(wait)
    except ValueError:
        return _fail(args.command, f"CANARY_WAIT must be a number of seconds, got {wait!r}", 2)

    async def go() -> tuple[int, str]:
        async with await _connect(args) as kube:
            return await send_command(
                kube,
                _namespace(args),
                args.name,
                args.command,
                who=args.who,
                reason=args.reason,
                wait_s=wait_s,
            )

    try:
        code, message = asyncio.run(go())
    except KubeError as exc:
        return _fail(args.command, f"{exc}{_why_cluster(args)}", EXIT_NO_ANSWER)
    if code == UNKNOWN:
        message += _why_cluster(args)
    print(message, file=sys.stdout if code == ACCEPTED else sys.stderr)
    return code


# ---- canary kubernetes --------------------------------------------------------------------


async def run_kubernetes(args: argparse.Namespace) -> int:
    from canary.kubernetes.access import KubeAccess
    from canary.kubernetes.client import LeaderElector
    from canary.kubernetes.operator import Operator, OperatorSettings
    from canary.kubernetes.shards import MAX_SHARDS, ShardElector
    from canary.reports.cluster import register_cluster_routes
    from canary.server.app import Server, make_app
    from canary.server.live import register_live

    if args.leader_elect and args.shards:
        return _fail(
            "kubernetes",
            "--leader-elect and --shards exclude each other: --shards N holds one Lease per "
            "shard (give --shards 1 for one actor)",
            EXIT_BAD,
        )
    if args.shards is not None and not 1 <= args.shards <= MAX_SHARDS:
        return _fail(
            "kubernetes",
            f"--shards must be between 1 and {MAX_SHARDS}, got {args.shards}",
            EXIT_BAD,
        )
    if args.lease_duration < 2:
        return _fail(
            "kubernetes",
            f"--lease-duration must be >= 2 seconds, got {args.lease_duration}",
            EXIT_BAD,
        )
    try:
        host, port = parse_listen(args.listen)
        own_namespace = os.environ.get("POD_NAMESPACE") or "canary-system"
        settings = OperatorSettings(
            prometheus_url=args.prometheus_url,
            record_namespace=args.record_namespace or own_namespace,
            namespace=None if args.all_namespaces else (args.namespace or None),
            tick_s=args.tick,
            identity=args.identity or "",
            allow_webhook_hosts=tuple(args.allow_webhook_host or ()),
        )
    except ValueError as exc:
        return _fail("kubernetes", str(exc), EXIT_BAD)
    tune_tls_reads()  # before any connection: many, each with a read buffer (canary.runtime)
    try:
        kube = await _connect(args)
    except KubeError as exc:
        return _fail("kubernetes", str(exc), EXIT_BAD)
    tune_gc()  # a long-running process with a large heap (canary.runtime)
    async with kube:
        identity = settings.identity or os.environ.get("POD_NAME") or os.uname().nodename
        timings = lease_timings(args.lease_duration)
        elector = shards = None
        if args.leader_elect:
            elector = LeaderElector(
                kube,
                namespace=args.lease_namespace or own_namespace,
                name=args.lease_name or "canary-leader",
                identity=identity,
                **timings,
            )
        elif args.shards:
            shards = ShardElector(
                kube,
                namespace=args.lease_namespace or own_namespace,
                prefix=args.lease_name or "canary-shard",
                shards=args.shards,
                identity=identity,
                **timings,
            )
        # The Leases are renewed on a thread with a client of its own: a loop busy with a
        # thousand rollouts cannot make them miss their deadline (issue 13).
        operator = Operator(
            kube,
            settings,
            elector=elector,
            shards=shards,
            lease_kube=functools.partial(_connect, args) if elector or shards else None,
        )
        app = make_app(
            operator,
            access=KubeAccess(kube, namespace=settings.namespace),
            public_reads=args.public_reads,
            ready=operator.ready,
            extensions=[
                register_live,
                functools.partial(register_cluster_routes, api=kube, refs=operator.record_refs),
            ],
        )
        server = Server(app, host=host, port=port)
        try:
            await server.start()
        except OSError as exc:
            return _fail("kubernetes", f"cannot listen on {host}:{port}: {exc}", EXIT_BAD)
        say(f"canary: serving on {server.url}", url=server.url)
        say(f"canary: live view: {server.url}/", url=f"{server.url}/")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await operator.run(stop)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await server.stop()
    return EXIT_OK


def lease_timings(lease_duration_s: int) -> dict[str, Any]:
    """client-go's ratios (15s, 10s, 2s): a holder that cannot renew stops acting at
    2/3 of the Lease duration, a third of it before anyone may take over."""
    return {
        "lease_duration_s": lease_duration_s,
        "renew_deadline_s": lease_duration_s * 2 / 3,
        "retry_period_s": min(2.0, lease_duration_s * 2 / 15),
    }


def _cmd_kubernetes(args: argparse.Namespace) -> int:
    tune_malloc()  # before any thread: one arena for them all (canary.runtime)
    try:
        # free memory back to the system (canary.runtime)
        return asyncio.run(trimmed(run_kubernetes(args)))
    except KubeError as exc:
        return _fail("kubernetes", str(exc), EXIT_NO_ANSWER)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `canary kubernetes` on the main CLI."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "kubernetes",
        help="run the controller for annotated Deployments in a cluster",
        description="Watch Deployments annotated canary.dev/enabled and roll out each new pod "
        "template as a canary. Serves /healthz, /readyz, /metrics and /rollouts. Stops "
        "cleanly on SIGTERM/SIGINT (rollouts resume where they were on the next start).",
    )
    parser.add_argument("--kubeconfig", metavar="FILE", help="kubeconfig (default: in-cluster)")
    parser.add_argument("--context", help="kubeconfig context")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", help="watch only this namespace")
    scope.add_argument(
        "-A", "--all-namespaces", action="store_true", help="watch every namespace (default)"
    )
    parser.add_argument(
        "--leader-elect", action="store_true", help="act only while holding the Lease"
    )
    parser.add_argument(
        "--shards",
        type=int,
        metavar="N",
        help="split the rollouts into N shards by a hash of namespace/name; a replica acts on "
        "a shard's rollouts while it holds the shard's Lease (LEASE_NAME-<i>-of-N), about a "
        "fair share each; excludes --leader-elect",
    )
    parser.add_argument(
        "--lease-name",
        help="the Lease (default: canary-leader), or the shard Leases' prefix (canary-shard)",
    )
    parser.add_argument("--lease-namespace", help="default: $POD_NAMESPACE, else canary-system")
    parser.add_argument(
        "--lease-duration",
        type=int,
        default=15,
        metavar="SECONDS",
        help="how long a Lease outlives its holder's last renewal (15); the holder stops "
        "acting at 2/3 of it when it cannot renew",
    )
    parser.add_argument("--identity", help="Lease holder identity (default: $POD_NAME or host)")
    parser.add_argument(
        "--listen", metavar="HOST:PORT", default="0.0.0.0:8080", help="default: 0.0.0.0:8080"
    )
    parser.add_argument(
        "--prometheus-url",
        default=os.environ.get("PROMETHEUS_URL", "http://prometheus-operated.monitoring:9090"),
        help="Prometheus to query (default: $PROMETHEUS_URL or "
        "http://prometheus-operated.monitoring:9090)",
    )
    parser.add_argument(
        "--record-namespace",
        help="namespace of the record ConfigMaps (default: $POD_NAMESPACE, else canary-system)",
    )
    parser.add_argument(
        "--tick", type=float, default=10.0, metavar="SECONDS", help="analysis interval (10)"
    )
    parser.add_argument(
        "--public-reads",
        action="store_true",
        help="serve /rollouts without a token (commands always need one: TokenReview and "
        "SubjectAccessReview for patch on the Deployment)",
    )
    parser.add_argument(
        "--allow-webhook-host",
        metavar="HOST",
        action="append",
        help="a webhook host that may be loopback, link-local or the API server (repeatable)",
    )
    add_log_format(parser)
    parser.set_defaults(func=_cmd_kubernetes)
    return parser
