"""On Kubernetes the planner counts the load a `rollout` hook asks `canary loadtest` for.

The Deployment's `canary.dev/webhook.rollout.metadata` names the rate (`rps`, and `at`); the
controller (the real Operator and kubernetes-asyncio client on the API emulator) says at the
start of the rollout, in its PassEstimate Event and the record, that the estimate includes
that load, while the hook (a real aiohttp receiver on 127.0.0.1) gets the metadata verbatim
each tick. No metrics are needed for the start estimate (it comes from `expected-rps`):
Prometheus' URL is a closed port, so the rollout only holds for want of data.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from support.kube import FAST_RETRY, deployment
from support.kube_emulator import KubeEmulator

from canary.demo.procs import free_port
from canary.kubernetes.client import Kube
from canary.kubernetes.operator import KubeState, Operator, OperatorSettings
from canary.kubernetes.spec import ANNOTATION_STATUS, SpecError, parse_annotations

pytestmark = pytest.mark.timeout(120)

DEPLOYMENTS = ("apps", "v1", "deployments")
INGRESSES = ("networking.k8s.io", "v1", "ingresses")
LOAD = {"url": "http://app-canary.shop/", "rps": "40", "duration": "30s"}


def _notes(hook_url: str, metadata: dict[str, str]) -> dict[str, str]:
    return {
        "canary.dev/enabled": "true",
        "canary.dev/router": "ingress-nginx",
        "canary.dev/ingress": "web",
        "canary.dev/steps": "50",
        "canary.dev/min-step-duration": "1s",
        "canary.dev/max-step-duration": "2m",
        "canary.dev/no-data-deadline": "5m",
        "canary.dev/expected-rps": "1",
        "canary.dev/webhook.rollout": hook_url,
        "canary.dev/webhook.rollout.metadata": json.dumps(metadata),
    }


def _ingress(namespace: str) -> dict[str, Any]:
    backend = {"service": {"name": "app-primary", "port": {"number": 80}}}
    path = {"path": "/", "pathType": "Prefix", "backend": backend}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {"rules": [{"host": "app.example", "http": {"paths": [path]}}]},
    }


async def _until(check: Callable[[], Any], *, what: str, timeout_s: float = 60.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not (value := check()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)
    return value


def _initialized(api: KubeEmulator, namespace: str) -> bool:
    notes = api.get(*DEPLOYMENTS, namespace, "app")["metadata"].get("annotations", {})
    state = KubeState.from_annotation(notes.get(ANNOTATION_STATUS))
    return state is not None and bool(state.primary_revision)


@contextlib.asynccontextmanager
async def _receiver(payloads: list[dict[str, Any]]) -> AsyncIterator[str]:
    """A rollout hook receiver answering 200, as `canary loadtest` does to a good payload."""

    async def hook(request: web.Request) -> web.Response:
        payloads.append(await request.json())
        return web.json_response({"status": "extended"})

    app = web.Application()
    app.router.add_post("/", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        await runner.cleanup()


async def test_pass_estimate_counts_the_rollout_hooks_load(
    api: KubeEmulator, tmp_path: Path
) -> None:
    """The first PassEstimate Event (and the record's advice) counts the 40 req/s the rollout
    hook's metadata asks for, with no other setting; the hook gets that metadata."""
    ns = "shop"
    payloads: list[dict[str, Any]] = []
    async with _receiver(payloads) as hook_url:
        api.put(*INGRESSES, _ingress(ns))
        api.put(*DEPLOYMENTS, deployment("app", ns, **_notes(hook_url, LOAD)))
        config = api.write_kubeconfig(tmp_path / "kubeconfig", token="token-a")
        kube = await Kube.connect(kubeconfig=str(config), retry=FAST_RETRY)
        operator = Operator(
            kube,
            OperatorSettings(
                prometheus_url=f"http://127.0.0.1:{free_port()}",  # nothing listens
                record_namespace="canary-system",
                namespace=ns,
                tick_s=0.4,
                record_flush_s=0.0,
                promote_poll_s=0.05,
                identity="token-a",
                allow_webhook_hosts=("127.0.0.1",),
            ),
        )
        task = asyncio.create_task(operator.run())
        try:
            await _until(lambda: _initialized(api, ns), what="initialization")
            obj = api.get(*DEPLOYMENTS, ns, "app")
            obj["spec"]["template"]["spec"]["containers"][0]["image"] = "example/app:2"
            api.put(*DEPLOYMENTS, obj)

            def estimates() -> list[str]:
                return [
                    o["message"]
                    for k, o in api.objects.items()
                    if k[2] == "events" and k[3] == ns and o.get("reason") == "PassEstimate"
                ]

            (first, *_) = await _until(estimates, what="a PassEstimate Event")
            await _until(lambda: payloads, what="the rollout hook's first call")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await kube.close()
    assert "40 req/s generated at the entry point by canary loadtest" in first, first
    assert "at 20.5 canary req/s" in first, first  # half of 1 + 40 at 50 %
    assert "Without the generated load:" in first, first
    assert payloads[0]["type"] == "rollout" and payloads[0]["metadata"] == LOAD, payloads[0]
    assert (payloads[0]["namespace"], payloads[0]["name"]) == (ns, "app")


def test_a_bad_rate_in_the_rollout_hooks_metadata_is_named() -> None:
    """`rps` and `at` in a rollout hook's metadata are the planner's input too: nonsense is
    refused naming the annotation, like any other."""
    key = "canary.dev/webhook.rollout.metadata"
    for metadata, message in (
        ({"rps": "lots"}, "rps: 'lots' is not a number"),
        ({"rps": "5", "at": "side"}, "at: must be entry (through the router) or canary"),
    ):
        notes = _notes("http://loadtest.test/", metadata)
        with pytest.raises(SpecError) as caught:
            parse_annotations(notes)
        assert message in caught.value.problems[key], caught.value.problems
    assert parse_annotations(_notes("http://loadtest.test/", {"rps": "5", "at": "canary"})).webhooks
