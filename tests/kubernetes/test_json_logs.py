"""`canary kubernetes --log-format json` as a process against the API emulator: every stderr
line is JSON, a rollout's lines name its Deployment and namespace, and /metrics labels the
rollout with its namespace and name."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from support.kube_emulator import KubeEmulator
from test_operator import _http, canary_weight, initialized, new_version, notes_for, seed, until

from canary.demo.procs import free_port

ROOT = Path(__file__).resolve().parents[2]


async def test_kubernetes_mode_logs_json_with_the_deployments_namespace(
    api: KubeEmulator, tmp_path: Path
) -> None:
    """A new template starts a rollout (no Prometheus: it holds at the first step on no
    data); the controller's stderr is JSON lines only, the runner's transition line says
    rollout app, namespace json, phase Progressing, and SIGTERM's note names them too;
    /metrics has canary_info{mode="kubernetes"} and the weight under namespace="json"."""
    ns = "json"
    seed(api, ns, notes_for())
    kubeconfig = api.write_kubeconfig(tmp_path / "kc", token="token-json")
    port = free_port()
    controller = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "canary",
        "kubernetes",
        f"--kubeconfig={kubeconfig}",
        f"--namespace={ns}",
        f"--listen=127.0.0.1:{port}",
        f"--prometheus-url=http://alice:pw-s3cret@127.0.0.1:{free_port()}",  # nothing there
        "--record-namespace=canary-system",
        "--tick=0.3",
        "--log-format=json",
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    metrics = ""
    try:
        await until(lambda: initialized(api, ns), what="initialization", timeout_s=60)
        new_version(api, ns, "example/app:2")
        await until(lambda: canary_weight(api, ns) == 30, what="the first step", timeout_s=60)

        def weight_shown() -> str:
            code, text = _http(f"http://127.0.0.1:{port}/metrics")
            wanted = 'canary_rollout_weight_percent{name="app",namespace="json",rollout="json/app"}'
            return text if code == 200 and f"{wanted} 30.0" in text else ""

        metrics = await until(lambda: weight_shown(), what="the weight on /metrics", timeout_s=30)
    finally:
        if controller.returncode is None:
            controller.send_signal(signal.SIGTERM)
        try:
            _, err = await asyncio.wait_for(controller.communicate(), 30)
        except TimeoutError:
            controller.kill()
            await controller.wait()
            raise
    stderr = err.decode()
    assert controller.returncode == 0, stderr[-2000:]
    events = [json.loads(line) for line in stderr.splitlines()]  # every line, or this raises
    assert all({"timestamp", "level", "logger", "message"} <= set(e) for e in events)
    assert "pw-s3cret" not in stderr
    assert any(e["message"].startswith("serving on http://127.0.0.1:") for e in events)
    runner = [e for e in events if e["logger"] == "canary.runner"]
    started = [e for e in runner if "Initializing -> Progressing" in e["message"]]
    assert started, runner
    assert {k: started[0].get(k) for k in ("rollout", "namespace", "phase", "weight")} == {
        "rollout": "app",
        "namespace": "json",
        "phase": "Progressing",
        "weight": 30,
    }
    stopped = [e for e in runner if "controller stopped" in e["message"]]
    assert stopped and stopped[0]["namespace"] == "json" and stopped[0]["rollout"] == "app"
    assert 'canary_info{mode="kubernetes",version="' in metrics
