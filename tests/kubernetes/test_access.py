"""`canary kubernetes`' HTTP server asks the cluster who calls and what they may do
(issue 11, points 1 and 2): TokenReview, then SubjectAccessReview on the Deployment, as
kube-rbac-proxy does; the recorded `who` is the cluster's user name; only the leader is Ready.

The API server is the emulator (tests/support/kube_emulator.py), with made-up users, tokens
and grants per test; the rollout is a stand-in RolloutSource that keeps the commands given.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from support.kube_emulator import KubeEmulator

from canary.core.rollout import Command
from canary.kubernetes.access import KubeAccess
from canary.kubernetes.client import Kube
from canary.kubernetes.operator import Operator, OperatorSettings
from canary.runner import CommandResult, UnknownRollout
from canary.runner.telemetry import Telemetry
from canary.server.app import Server, make_app


@dataclass
class FakeSource:
    """One rollout, shop/app, that accepts every command and keeps it."""

    started: asyncio.Event = field(default_factory=asyncio.Event)
    telemetry: Telemetry = field(default_factory=Telemetry)
    commands: list[Command] = field(default_factory=list)

    def states(self) -> list[dict[str, Any]]:
        return [{"name": "shop/app", "phase": "Progressing"}]

    async def command(self, name: str, command: Command) -> CommandResult:
        if name != "shop/app":
            raise UnknownRollout(name)
        self.commands.append(command)
        return CommandResult(True, "Succeeded", "promoted")


@dataclass
class Served:
    source: FakeSource
    url: str
    http: aiohttp.ClientSession

    async def call(
        self, method: str, path: str, token: str | None = None, **kwargs: Any
    ) -> tuple[int, Any]:
        headers = dict(kwargs.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        async with self.http.request(
            method, self.url + path, headers=headers, **kwargs
        ) as response:
            return response.status, await response.json(content_type=None)


@pytest.fixture
async def served(api: KubeEmulator, kube: Kube) -> AsyncIterator[Served]:
    api.add_user("tok-alice", "alice")  # may patch Deployments in shop
    api.grant("alice", "patch", namespace="shop")
    api.grant("alice", "get", namespace="shop")
    api.add_user("tok-bob", "bob", groups=("viewers",))  # may only read, through a group
    api.grant("viewers", "get", namespace="shop")
    source = FakeSource()
    source.started.set()
    app = make_app(source, access=KubeAccess(kube, namespace="shop"))
    async with Server(app) as server, aiohttp.ClientSession() as http:
        yield Served(source, server.url, http)


PROMOTE = "/rollouts/shop/app/promote"


async def test_no_token_and_a_wrong_token_are_401(served: Served, api: KubeEmulator) -> None:
    status, body = await served.call("POST", PROMOTE, json={})
    assert status == 401 and "Bearer" in body["error"]
    status, body = await served.call("POST", PROMOTE, "not-a-token", json={})
    assert status == 401 and "not valid in this cluster" in body["error"]
    assert served.source.commands == []
    assert not api.recorded(resource="subjectaccessreviews")  # nobody to ask about


async def test_a_user_without_patch_is_403(served: Served, api: KubeEmulator) -> None:
    status, body = await served.call("POST", PROMOTE, "tok-bob", json={"who": "alice"})
    assert status == 403 and body["error"] == "bob may not patch deployments/app in namespace shop"
    assert served.source.commands == []
    [review] = api.recorded(resource="subjectaccessreviews")
    assert review.body["spec"]["user"] == "bob" and "viewers" in review.body["spec"]["groups"]
    assert review.body["spec"]["resourceAttributes"] == {
        "verb": "patch",
        "group": "apps",
        "resource": "deployments",
        "namespace": "shop",
        "name": "app",
    }


async def test_an_authorized_command_records_the_clusters_name(served: Served) -> None:
    """alice may patch shop/app: 200, and the command's `who` is alice whatever the body says."""
    status, _ = await served.call(
        "POST", PROMOTE, "tok-alice", json={"who": "mallory", "reason": "ship it"}
    )
    assert status == 200
    [command] = served.source.commands
    assert (command.command, command.who, command.reason) == ("promote", "alice", "ship it")


async def test_reads_need_get_and_a_cross_origin_form_post_is_refused(served: Served) -> None:
    assert (await served.call("GET", "/rollouts"))[0] == 401
    assert (await served.call("GET", "/rollouts", "tok-bob"))[0] == 200
    assert (await served.call("GET", "/rollouts/shop/app", "tok-bob"))[0] == 200
    for path in ("/healthz", "/readyz", "/metrics"):
        async with served.http.get(served.url + path) as response:
            assert response.status == 200
    form = {"Content-Type": "application/x-www-form-urlencoded", "Origin": "http://evil.example"}
    status, _ = await served.call("POST", PROMOTE, "tok-alice", data="who=x", headers=form)
    assert status == 403 and served.source.commands == []


async def test_an_api_server_that_cannot_answer_is_503_never_an_allow(
    served: Served, api: KubeEmulator
) -> None:
    api.inject(500, times=100, resource="tokenreviews")
    status, _ = await served.call("POST", PROMOTE, "tok-alice", json={})
    assert status == 503 and served.source.commands == []


async def test_a_standby_replica_is_not_ready(api: KubeEmulator, kube: Kube) -> None:
    """A replica that does not hold the Lease runs no rollouts: /readyz is 503, so the
    Service sends nobody there; /healthz stays 200 (the process is alive)."""

    class Standby:
        is_leader = False

    operator = Operator(
        kube,
        OperatorSettings(prometheus_url="http://127.0.0.1:9", record_namespace="canary-system"),
        elector=Standby(),  # type: ignore[arg-type]
    )
    operator.started.set()  # it has listed the Deployments, as a standby does
    app = make_app(operator, access=KubeAccess(kube, namespace=None), ready=operator.ready)
    async with Server(app) as server, aiohttp.ClientSession() as http:
        async with http.get(server.url + "/readyz") as response:
            assert response.status == 503
        async with http.get(server.url + "/healthz") as response:
            assert response.status == 200
        async with http.get(server.url + "/metrics") as response:
            assert "\ncanary_leader 0.0\n" in await response.text()
        operator._leading = True  # what run() sets when the elector reports the Lease won
        Standby.is_leader = True
        async with http.get(server.url + "/readyz") as response:
            assert response.status == 200
        async with http.get(server.url + "/metrics") as response:
            assert "\ncanary_leader 1.0\n" in await response.text()


async def test_a_name_without_a_namespace_is_asked_about_the_watched_namespace(
    api: KubeEmulator, kube: Kube
) -> None:
    """A route naming no namespace (e.g. the list) is a question about every Deployment in
    the watched namespace, never about a same-named one elsewhere."""
    api.add_user("tok-carol", "carol")
    api.grant("carol", "get", namespace="shop")
    access = KubeAccess(kube, namespace="shop")
    identity = await access.authorize("tok-carol", verb="get", namespace=None, name="app")
    assert identity.name == "carol" and identity.authoritative
    [review] = api.recorded(resource="subjectaccessreviews")
    attributes = review.body["spec"]["resourceAttributes"]
    assert attributes["namespace"] == "shop" and "name" not in attributes
