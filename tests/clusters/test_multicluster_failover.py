"""Failover through the real paths: `canary failover`/`failback` over HTTP, and an outage mid-rollout.

The controller is the whole two-cluster wiring (build_controller): two emulated clusters,
the real PowerDNS router, entry points on 127.0.0.10 / 127.0.0.20 that can go down, the
server with its /failover routes, and the `canary` CLI run as a separate process. Prometheus
is a dead port here on purpose: a rollout then holds on "no data", which is what a rollout in
progress looks like to the failover.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from support.kube_emulator import KubeEmulator
from support.pdns import API_KEY, PdnsServer, free_port, pdns
from test_failover_controller import EntryPoint

from canary.clusters.multicluster import (
    ENABLED_ANNOTATION,
    MultiClusterController,
    build_controller,
    failover_routes,
)
from canary.clusters.topology import Topology, parse_topology
from canary.core.failover import Mode
from canary.core.records import read_record
from canary.demo.dnsload import DnsLoadGenerator
from canary.kubernetes.client import Kube, RetryPolicy
from canary.server.app import Server, make_app
from canary.server.auth import TokenAccess, create_token_file

__all__ = ["pdns"]

PRIMARY_IP, STANDBY_IP = "127.0.0.10", "127.0.0.20"
NS = "shop"
INTERVAL, TIMEOUT, N, TTL = 0.2, 0.5, 3, 1
FAST = RetryPolicy(attempts=2, initial_delay_s=0.01, max_delay_s=0.05)


def deployment(image: str) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "shop", "namespace": NS, "annotations": {ENABLED_ANNOTATION: "true"}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "shop"}},
            "template": {
                "metadata": {"labels": {"app": "shop"}},
                "spec": {"containers": [{"name": "shop", "image": image}]},
            },
        },
    }


def make_topology(
    pdns: PdnsServer,
    tmp_path: Path,
    port: int,
    *,
    name: str,
    policy: dict[str, Any],
    state_dir: str = "state",
    webhooks: list[dict[str, Any]] | None = None,
    service: dict[str, Any] | None = None,
) -> Topology:
    dead = f"http://127.0.0.1:{free_port()}"  # no Prometheus: rollouts hold on "no data"

    def cluster(cluster_name: str, ip: str) -> dict[str, Any]:
        return {
            "name": cluster_name,
            "entry_point": ip,
            "prometheus": {"url": dead, "selector": f'cluster="{cluster_name}"', "timeout_s": 0.5},
        }

    return parse_topology(
        {
            "clusters": {
                "primary": cluster("eu-1", PRIMARY_IP),
                "canary": cluster("eu-2", STANDBY_IP),
            },
            "state_dir": str(tmp_path / state_dir),
            "state_namespace": "canary-system",
            "record_dir": str(tmp_path / "records"),
            "services": [
                {
                    "name": "shop",
                    "dns_name": f"{name}.{pdns.zone}",
                    "namespace": NS,
                    "deployment": "shop",
                    "router": {
                        "kind": "powerdns",
                        "api_url": pdns.api_url,
                        "zone": pdns.zone,
                        "ttl": TTL,
                        "dns_server": "127.0.0.1",
                        "dns_port": pdns.dns_port,
                    },
                    "steady_canary_percent": 10,
                    "steps": [50],
                    "min_step_s": 1,
                    "no_data_deadline_s": 120,
                    "tick_s": 0.3,
                    "health": {"port": port, "interval_s": INTERVAL, "timeout_s": TIMEOUT},
                    "failover": {"failures_to_failover": N, "healthy_s_to_failback": 1, **policy},
                    "webhooks": webhooks or [],
                    **(service or {}),
                }
            ],
        }
    )


@dataclass
class Env:
    primary: EntryPoint
    standby: EntryPoint
    primary_api: KubeEmulator
    canary_api: KubeEmulator
    controller: MultiClusterController
    server: Server
    topology: Topology
    kubes: list[Kube]
    session: aiohttp.ClientSession
    task: asyncio.Task[None]

    async def stop_controller(self) -> None:
        self.controller.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    async def cli(self, *args: str) -> tuple[int, str, str]:
        """Run `canary ARGS --server URL` as its own process."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "canary",
            *args,
            "--server",
            self.server.url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={
                **os.environ,
                "USER": "dana",
                "CANARY_TOKEN_FILE": str(self.topology.record_dir.parent / "canary.token"),
            },
        )
        out, err = await proc.communicate()
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    @property
    def service(self) -> Any:
        return self.controller.services["shop"]


@contextlib.asynccontextmanager
async def running(
    pdns: PdnsServer,
    tmp_path: Path,
    *,
    name: str,
    policy: dict[str, Any] | None = None,
    webhooks: list[dict[str, Any]] | None = None,
    service: dict[str, Any] | None = None,
) -> AsyncIterator[Env]:
    port = free_port()
    primary, standby = EntryPoint(PRIMARY_IP, port), EntryPoint(STANDBY_IP, port)
    await primary.up()
    await standby.up()
    topology = make_topology(
        pdns, tmp_path, port, name=name, policy=policy or {}, webhooks=webhooks, service=service
    )
    async with KubeEmulator() as primary_api, KubeEmulator() as canary_api:
        primary_api.put("apps", "v1", "deployments", deployment("shop:1"))
        canary_api.put("apps", "v1", "deployments", deployment("shop:1"))
        kubes = []
        for label, api in (("primary", primary_api), ("canary", canary_api)):
            path = api.write_kubeconfig(tmp_path / f"{label}.kubeconfig", context=label)
            kubes.append(await Kube.connect(kubeconfig=str(path), context=label, retry=FAST))
        session = aiohttp.ClientSession()
        controller = build_controller(
            topology,
            session,
            primary=kubes[0],
            canary=kubes[1],
            probe_interval_s=INTERVAL,
            poll_s=0.2,
            allow_webhook_hosts=("127.0.0.1",),  # the tests' receivers are on loopback
        )
        token_file = tmp_path / "canary.token"
        access = TokenAccess(create_token_file(token_file))
        server = Server(
            make_app(controller, access=access, extensions=[failover_routes(controller)])
        )
        await server.start()
        task = asyncio.create_task(controller.run())
        try:
            yield Env(
                primary,
                standby,
                primary_api,
                canary_api,
                controller,
                server,
                topology,
                kubes,
                session,
                task,
            )
        finally:
            controller.stop()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await server.stop()
            await session.close()
            for kube in kubes:
                await kube.close()
            for service in controller.services.values():
                if service.rollouts is not None:
                    service.rollouts.metrics.close()
            await primary.down()
            await standby.down()


async def wait_for(predicate: Any, timeout_s: float, what: str) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            # polling: the state changes inside the controller's tasks
            while not await predicate():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout_s}s waiting for {what}") from None


async def weight_is(env: Env, weight: int) -> bool:
    try:
        return bool(await env.service.failover.router.get_weight() == weight)
    except Exception:
        return False


def event_reasons(api: KubeEmulator) -> list[str]:
    return [obj["reason"] for key, obj in api.objects.items() if key[2] == "events"]


@pytest.fixture(autouse=True)
def _api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDNS_API_KEY", API_KEY)


async def test_cli_failover_and_failback_are_idempotent_and_recorded(
    pdns: PdnsServer, tmp_path: Path
) -> None:
    """`canary failover --to standby` then again, then `canary failback`: weights follow, repeats change nothing, who/why recorded and sent as Events."""
    async with running(pdns, tmp_path, name="manual") as env:
        await wait_for(lambda: weight_is(env, 10), 10, "the steady 10%")
        await wait_for(lambda: _probed(env), 5, "a first probe")
        code, out, err = await env.cli("failover", "--to", "standby", "--reason", "maintenance")
        assert code == 0, err
        assert "shop: on standby (pinned by dana); done" in out
        assert await env.service.failover.router.get_weight() == 100
        code, out, _ = await env.cli(
            "failover", "--to", "standby", "--reason", "again", "--as", "erin"
        )
        assert code == 0 and "on standby (pinned by dana); done: maintenance" in out  # unchanged
        await asyncio.sleep(3 * INTERVAL)
        assert env.service.failover.state.mode is Mode.STANDBY  # pinned: no automatic failback
        code, out, _ = await env.cli("failover", "--status")
        assert code == 0 and "shop: on standby (pinned by dana)" in out
        code, out, err = await env.cli("failback", "--reason", "done")
        assert code == 0, err
        assert "shop: on primary (last moved by dana); done: done" in out
        assert await env.service.failover.router.get_weight() == 10
        entries = read_record(env.topology.record_dir / "shop-clusters.jsonl")
        moves = [(e.direction, e.who, e.reason) for e in entries if e.kind == "failover"]  # type: ignore[union-attr]
        assert moves == [("to-standby", "dana", "maintenance"), ("to-primary", "dana", "done")]
        notes = [e.message for e in entries if e.kind == "note"]  # type: ignore[union-attr]
        assert any(m.startswith("erin: again") and "nothing changed" in m for m in notes)
        assert {"FailedOver", "FailedBack"} <= set(event_reasons(env.canary_api))


async def test_cli_refuses_failover_to_an_unhealthy_standby_unless_forced(
    pdns: PdnsServer, tmp_path: Path
) -> None:
    """With the standby down, `canary failover` exits 1 naming the reason; --force moves traffic and is recorded as forced."""
    async with running(pdns, tmp_path, name="refuse") as env:
        await wait_for(lambda: weight_is(env, 10), 10, "the steady 10%")
        await env.standby.down()
        await wait_for(lambda: _standby_unhealthy(env), 5, "the standby to look unhealthy")
        code, _, err = await env.cli("failover", "--to", "standby", "--reason", "drill")
        assert code == 1
        assert "REFUSED" in err and "unhealthy (use --force to override)" in err
        assert await env.service.failover.router.get_weight() == 10
        code, _out, err = await env.cli(
            "failover", "--to", "standby", "--reason", "drill", "--force"
        )
        assert code == 0, err
        assert await env.service.failover.router.get_weight() == 100
        entries = read_record(env.topology.record_dir / "shop-clusters.jsonl")
        moves = [e for e in entries if e.kind == "failover"]
        assert len(moves) == 1 and moves[0].forced  # type: ignore[union-attr]
        code, _, err = await env.cli("failover", "--to", "sideways")
        assert code == 2 and "invalid choice" in err
        code, _, err = await env.cli("failover", "--to", "standby", "--service", "nope")
        assert code == 4 and "no two-cluster service named 'nope'" in err


async def test_primary_outage_mid_rollout_aborts_it_and_moves_clients_within_the_bound(
    pdns: PdnsServer, tmp_path: Path
) -> None:
    """A rollout holds at 50%; the primary goes down: the rollout is aborted (record, Events), the standby is reverted first (policy), and every client is on the standby within interval x (N+1) + timeouts + TTL."""
    async with running(
        pdns, tmp_path, name="outage", policy={"canary_on_standby": "revert-first"}
    ) as env:
        rollouts = env.service.rollouts
        await wait_for(lambda: weight_is(env, 10), 10, "the steady 10%")
        env.canary_api.put("apps", "v1", "deployments", deployment("shop:2"))
        await wait_for(lambda: weight_is(env, 50), 10, "the rollout's 50%")
        assert rollouts.rollout_active()
        loadgen = DnsLoadGenerator(
            "127.0.0.1",
            pdns.dns_port,
            f"outage.{pdns.zone}",
            env.primary.port,
            rate=100,
            path="/healthz",
        )
        load = asyncio.create_task(loadgen.run())
        try:
            await asyncio.sleep(1.5)
            assert loadgen.share(PRIMARY_IP, 0.0) not in (None, 0.0)  # both sides served
            outage = loadgen.clock()
            # the whole primary cluster is down: its API too (the revert uses the last read)
            env.primary_api.inject(503, times=10_000)
            await env.primary.down()
            await wait_for(lambda: _on(env, Mode.STANDBY), 15, "the failover")
            # every client re-resolves within one TTL; then a second of standby-only traffic
            await asyncio.sleep(TTL + 1.5)
        finally:
            loadgen.stop()
            await load
        moved = loadgen.moved_at(STANDBY_IP, outage)
        assert moved is not None
        bound = (N + 1) * (INTERVAL + TIMEOUT) + TTL + 1.0  # + revert and API writes
        print(f"outage -> every client on the standby: {moved - outage:.2f}s (bound {bound:.2f}s)")
        assert moved - outage <= bound, (moved - outage, bound)
        assert loadgen.share(STANDBY_IP, moved) == 1.0
        assert loadgen.sent[-1].at - moved > 1.0  # and it stayed there
        # the rollout was aborted by the failover, and says so in its own record
        assert rollouts.finished and rollouts.finished[0][1] == "aborted"
        record = read_record(rollouts.runner.record_path)
        manual = [e for e in record if e.kind == "manual"]
        assert manual and manual[0].who == "failover" and manual[0].command == "abort"  # type: ignore[union-attr]
        assert record[-1].kind == "end" and record[-1].outcome == "aborted"  # type: ignore[union-attr]
        # revert-first: the standby runs the last promoted template again
        dep = env.canary_api.get("apps", "v1", "deployments", NS, "shop")
        assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "shop:1"
        reasons = event_reasons(env.canary_api)
        assert {"RolloutAborted", "Reverted", "FailedOver"} <= set(reasons)
        assert env.service.failover.state.mode is Mode.STANDBY
        assert await env.service.failover.router.get_weight() == 100


async def test_restart_during_an_outage_stays_on_the_standby_and_says_so(
    pdns: PdnsServer, tmp_path: Path
) -> None:
    """A new controller on an empty disk resumes on the standby from the ConfigMap mirror: no failback, no weight flip, status shows it."""
    async with running(pdns, tmp_path, name="restart") as env:
        await wait_for(lambda: weight_is(env, 10), 10, "the steady 10%")
        await env.primary.down()
        await wait_for(lambda: _on(env, Mode.STANDBY), 10, "the failover")

        async def mirrored_standby() -> bool:
            # The mirror is written after the state file: wait for it, do not race it.
            try:
                mirrored = env.canary_api.get(
                    "", "v1", "configmaps", "canary-system", "canary-failover-shop"
                )
            except KeyError:
                return False
            return '"mode":"standby"' in mirrored["data"]["state"]

        await wait_for(mirrored_standby, 10, "the standby mode mirrored to the ConfigMap")
        # The weights move after the state is saved and mirrored: stopping before the move is
        # done leaves the restarted controller a weight to re-assert (CI saw it once).
        await wait_for(lambda: weight_is(env, 100), 10, "all traffic on the standby")
        await env.stop_controller()
        await env.primary.up()  # back while no controller runs; failback is manual by default
        fresh = make_topology(
            pdns, tmp_path, env.primary.port, name="restart", policy={}, state_dir="fresh-disk"
        )
        controller = build_controller(
            fresh,
            env.session,
            primary=env.kubes[0],
            canary=env.kubes[1],
            probe_interval_s=INTERVAL,
            poll_s=0.2,
        )
        task = asyncio.create_task(controller.run())
        try:
            await wait_for(lambda: _probed_by(controller), 5, "a probe")
            weights = []
            for _ in range(8):
                weights.append(await controller.services["shop"].failover.router.get_weight())
                await asyncio.sleep(INTERVAL)
        finally:
            controller.stop()
            await task
        service = controller.services["shop"]
        assert set(weights) == {100}
        assert service.failover.state.mode is Mode.STANDBY and service.failover.moves == []
        assert service.failover.state.primary_healthy_since is not None  # it saw the primary back
        assert (tmp_path / "fresh-disk" / "shop.failover.json").exists()
        for svc in controller.services.values():
            if svc.rollouts is not None:
                svc.rollouts.metrics.close()


async def _probed_by(controller: MultiClusterController) -> bool:
    return controller.services["shop"].failover.last_probe is not None


async def _probed(env: Env) -> bool:
    return env.service.failover.last_probe is not None


async def _standby_unhealthy(env: Env) -> bool:
    return env.service.failover.state.standby_healthy is False


async def _on(env: Env, mode: Mode) -> bool:
    return bool(env.service.failover.state.mode is mode)


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_canary_clusters_runs_a_topology_serves_failover_and_stops_on_sigterm(
    pdns: PdnsServer, tmp_path: Path, log_format: str
) -> None:
    """`canary clusters --topology FILE` connects to both clusters by kubeconfig, serves /failover, and exits 3 cleanly on SIGTERM; with `--log-format json` every stderr line is a JSON object."""
    port, listen = free_port(), free_port()
    primary, standby = EntryPoint(PRIMARY_IP, port), EntryPoint(STANDBY_IP, port)
    await primary.up()
    await standby.up()
    try:
        async with KubeEmulator() as primary_api, KubeEmulator() as canary_api:
            primary_api.put("apps", "v1", "deployments", deployment("shop:1"))
            canary_api.put("apps", "v1", "deployments", deployment("shop:1"))
            data = make_topology(pdns, tmp_path, port, name="cli", policy={}).model_dump(
                mode="json"
            )
            for side, api in (("primary", primary_api), ("canary", canary_api)):
                path = api.write_kubeconfig(tmp_path / f"{side}.kubeconfig", context=side)
                data["clusters"][side].update(kubeconfig=path.name, context=side)
            (tmp_path / "topology.yaml").write_text(yaml.safe_dump(data))
            token = create_token_file(tmp_path / "cli.token")
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "canary",
                "clusters",
                "--topology",
                str(tmp_path / "topology.yaml"),
                "--listen",
                f"127.0.0.1:{listen}",
                "--token-file",
                str(tmp_path / "cli.token"),
                "--log-format",
                log_format,
                stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "PDNS_API_KEY": API_KEY},
            )
            try:
                url = f"http://127.0.0.1:{listen}"
                async with aiohttp.ClientSession() as session:
                    await wait_for(lambda: _answers(session, url), 20, "the server")
                    async with session.get(f"{url}/failover") as response:
                        assert response.status == 401  # /failover needs the token too
                    async with session.get(f"{url}/") as response:  # the live view's page
                        assert response.status == 200
                        assert "canary: live view" in await response.text()
                    async with session.get(f"{url}/rollouts?history=1") as response:
                        assert response.status == 401  # its data needs the token
                async with aiohttp.ClientSession(
                    headers={"Authorization": f"Bearer {token}"}
                ) as session:
                    await wait_for(lambda: _failover_state(session, url), 20, "the server")
                    state = await _failover_state(session, url)
                assert state is not None and state["failover"]["mode"] == "primary"
                assert state["dns_name"] == f"cli.{pdns.zone}"
            finally:
                proc.send_signal(signal.SIGTERM)
                _, err = await asyncio.wait_for(proc.communicate(), 20)
            assert proc.returncode == 3, err.decode()
            assert b"serving on" in err
            assert f"live view: http://127.0.0.1:{listen}/".encode() in err
            if log_format == "json":
                events = [json.loads(line) for line in err.decode().splitlines()]
                assert all({"timestamp", "level", "logger", "message"} <= set(e) for e in events)
                assert any(e.get("url") == f"http://127.0.0.1:{listen}" for e in events)
    finally:
        await primary.down()
        await standby.down()


async def _answers(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(f"{url}/healthz") as response:
            return response.status == 200
    except aiohttp.ClientError:
        return False


async def _failover_state(session: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
    try:
        async with session.get(f"{url}/failover") as response:
            body = await response.json()
    except aiohttp.ClientError:
        return None
    services = body.get("services") or []
    return services[0] if services and services[0].get("last_probe") else None


def test_canary_clusters_names_a_bad_topology_and_a_missing_key(tmp_path: Path) -> None:
    """A bad field and an unset API key variable both exit 2 with the file, the field or the variable named."""
    bad = tmp_path / "t.yaml"
    bad.write_text("clusters: {}\nservices: []\n")
    result = subprocess.run(
        [sys.executable, "-m", "canary", "clusters", "--topology", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        result.returncode == 2
        and "t.yaml: clusters.primary: required key is missing" in result.stderr
    )
    good = make_topology(PdnsServer(1, "http://127.0.0.1:1"), tmp_path, 80, name="k", policy={})
    bad.write_text(yaml.safe_dump(good.model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if k != "PDNS_API_KEY"}
    result = subprocess.run(
        [sys.executable, "-m", "canary", "clusters", "--topology", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 2 and "$PDNS_API_KEY is not set" in result.stderr


async def test_a_new_version_is_judged_only_once_rolled_out_and_one_that_cannot_is_reverted(
    pdns: PdnsServer, tmp_path: Path
) -> None:
    """No traffic moves while the canary cluster's pods roll out; a progress deadline exceeded reverts it without a rollout."""
    async with running(pdns, tmp_path, name="notready") as env:
        rollouts = env.service.rollouts
        await wait_for(lambda: weight_is(env, 10), 10, "the steady 10%")
        env.canary_api.simulate_deployments = False  # pods of the new version still starting
        env.canary_api.put("apps", "v1", "deployments", deployment("shop:2"))
        await asyncio.sleep(1.0)
        assert rollouts.runner is None and await weight_is(env, 10)
        stuck = env.canary_api.get("apps", "v1", "deployments", NS, "shop")
        stuck["status"] = {
            "observedGeneration": stuck["metadata"]["generation"],
            "conditions": [
                {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}
            ],
        }
        env.canary_api.put("apps", "v1", "deployments", stuck)
        env.canary_api.simulate_deployments = True  # the revert's pods start normally
        await wait_for(lambda: _finished(rollouts), 10, "the failed version to be handled")
        assert rollouts.finished[0][1] == "rolled_back" and rollouts.runner is None
        # the Event follows the revert's rollout, so it also says the image is back
        await wait_for(lambda: _has_event(env.canary_api, "Reverted"), 5, "the Reverted event")
        dep = env.canary_api.get("apps", "v1", "deployments", NS, "shop")
        assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "shop:1"
        assert "RolloutFailed" in event_reasons(env.canary_api)
        assert await weight_is(env, 10)


async def _finished(rollouts: Any) -> bool:
    return bool(rollouts.finished)


async def _has_event(api: KubeEmulator, reason: str) -> bool:
    return reason in event_reasons(api)
