"""Asking a running operator through a Deployment's annotations: a manual command, the record.

The client half of what ``operator`` serves: `send_command` writes the `canary.dev/command`
annotation (never the spec, so GitOps tools do not revert it) and waits for the controller's
answer in the status annotation; `fetch_record` follows the status to the record ConfigMap of
the current or last rollout. The `canary` command line (canary.cli.kubernetes) and the tests
use them.

`send_command`'s answer codes are the CLI's exit statuses, so `canary promote` passes them on.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from canary.kubernetes.client import Kube, KubeError, NotFound
from canary.kubernetes.operator import KubeState, ManualRequest
from canary.kubernetes.spec import ANNOTATION_COMMAND, ANNOTATION_STATUS

__all__ = [
    "ACCEPTED",
    "DEFAULT_WAIT_S",
    "NO_ANSWER",
    "REFUSED",
    "UNKNOWN",
    "fetch_record",
    "send_command",
]

# send_command's answers (the `canary` exit statuses 0, 1, 3, 4)
ACCEPTED, REFUSED, NO_ANSWER, UNKNOWN = 0, 1, 3, 4
DEFAULT_WAIT_S = 30.0


def _annotations(obj: dict[str, Any]) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("annotations") or {})


async def send_command(
    kube: Kube,
    namespace: str,
    name: str,
    command: str,
    *,
    who: str,
    reason: str = "",
    wait_s: float = DEFAULT_WAIT_S,
    poll_s: float = 0.2,
) -> tuple[int, str]:
    """Write the command annotation and wait for the controller's answer.
    Returns (exit status, message)."""
    request = ManualRequest(
        id=uuid.uuid4().hex[:12],
        command=command,  # type: ignore[arg-type]
        who=who,
        reason=reason,
        at=time.time(),
    )
    try:
        await kube.get_deployment(namespace, name)
    except NotFound:
        return UNKNOWN, f"no Deployment {namespace}/{name}"
    # A merge patch of one annotation: the spec is never part of what is sent.
    await kube.patch_deployment(
        namespace,
        name,
        {"metadata": {"annotations": {ANNOTATION_COMMAND: request.model_dump_json()}}},
    )
    deadline = time.monotonic() + wait_s
    while True:
        obj = await kube.get_deployment(namespace, name)
        try:
            state = KubeState.from_annotation(_annotations(obj).get(ANNOTATION_STATUS))
        except ValueError:
            state = None
        answer = state.command if state is not None else None
        if answer is not None and answer.id == request.id:
            phase = state.rollout.phase.value if state and state.rollout else "Idle"
            if answer.accepted:
                return ACCEPTED, f"{namespace}/{name}: {command} accepted; now {phase}"
            return REFUSED, f"{namespace}/{name}: {command} refused: {answer.message}"
        if time.monotonic() >= deadline:
            return NO_ANSWER, (
                f"{namespace}/{name}: {command} is recorded in the {ANNOTATION_COMMAND} "
                f"annotation, but the controller has not answered within {wait_s:g}s "
                "(is `canary kubernetes` running and leading?)"
            )
        await asyncio.sleep(poll_s)


async def fetch_record(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    """The record ConfigMap of Deployment namespace/name's current or last rollout."""
    try:
        obj = await kube.get_deployment(namespace, name)
    except NotFound:
        raise KubeError(f"no Deployment {namespace}/{name}") from None
    state = KubeState.from_annotation(_annotations(obj).get(ANNOTATION_STATUS))
    if state is None or not state.record:
        raise KubeError(f"Deployment {namespace}/{name} has no rollout record yet")
    record_namespace, _, configmap = state.record.partition("/")
    return await kube.get_configmap(record_namespace, configmap)
