"""Helpers shared by the Kubernetes tests: a minimal Deployment and a fast retry policy."""

from __future__ import annotations

from typing import Any

from canary.kubernetes.client import RetryPolicy

# Short backoff: the tests exercise retries, not patience.
FAST_RETRY = RetryPolicy(attempts=4, initial_delay_s=0.01, max_delay_s=0.05)


def deployment(name: str = "app", namespace: str = "default", **annotations: str) -> dict[str, Any]:
    """A minimal valid apps/v1 Deployment."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "annotations": dict(annotations)},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": name, "image": f"example/{name}:1"}]},
            },
        },
    }


# Metadata another party sets on an object the controller replaces (a team's label and
# annotation, a backup tool's finalizer, an owner): a replace must keep all of it.
THEIRS: dict[str, Any] = {
    "labels": {"team": "platform"},
    "annotations": {"note": "kept"},
    "finalizers": ["example.com/keep"],
    "ownerReferences": [{"apiVersion": "v1", "kind": "Secret", "name": "s", "uid": "u1"}],
}
