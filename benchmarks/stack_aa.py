"""The demo stack's two identical services, with no controller: slow-request shares by weight.

    python -m benchmarks.stack_aa --weights 10,20,50,80 --hold-s 20

Why this exists: in the static SIGKILL campaign (benchmarks/kill_campaign.py), A/A rollouts
on the demo stack roll back on latency_p50 far more often than A/A rollouts in Kubernetes mode
(exporters hit directly, no HAProxy). This measures the stack alone: the same ServiceSpec for
both versions (5 ms log-normal latency, sigma 0.3, 0.5% errors, the same seed), HAProxy weights
set through its admin socket, 300 requests/s from the demo's open-loop load generator, and per
weight the share of each version's requests slower than 10 ms over the last `hold_s - 5`
seconds, from Prometheus (the services' own histograms: server-side time). If the shares
differ at equal settings, the difference is in the stack, and an analysis that reports it is
right to.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from canary.demo.stack import ServiceSpec, Stack, StackSettings  # noqa: E402
from canary.routers.haproxy import HAProxyRouter  # noqa: E402


def _query(base: str, expr: str) -> float:
    url = base + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as response:  # loopback Prometheus only
        result = json.load(response)["data"]["result"]
    return float(result[0]["value"][1]) if result else 0.0


def slow_shares(base: str, window_s: int, threshold: str) -> dict[str, tuple[int, float]]:
    """Per version: (requests, % slower than `threshold` seconds) over the last window_s."""
    out = {}
    for version in ("primary", "canary"):
        sel = f'version="{version}"'
        total = _query(
            base, f"sum(increase(http_request_duration_seconds_count{{{sel}}}[{window_s}s]))"
        )
        fast = _query(
            base,
            f'sum(increase(http_request_duration_seconds_bucket{{{sel},le="{threshold}"}}[{window_s}s]))',
        )
        out[version] = (round(total), round(100 * (1 - fast / total), 2) if total else float("nan"))
    return out


async def main(args: argparse.Namespace) -> None:
    spec = ServiceSpec(error_rate=0.005, latency_ms=5.0, latency_jitter=0.3, seed=args.seed)
    settings = StackSettings(primary=spec, canary=spec, rate=args.rate, scrape_interval_s=0.5)
    with tempfile.TemporaryDirectory(prefix="stack-aa-") as tmp:
        async with Stack(settings, workdir=Path(tmp)) as stack:
            await stack.wait_for_metrics()
            router = HAProxyRouter(stack.socket_path, "app", "primary", "canary", timeout_s=2)
            assert stack.prometheus is not None
            print(
                "| canary weight | primary requests | primary % > 10 ms | canary requests | canary % > 10 ms |"
            )
            print("|---:|---:|---:|---:|---:|")
            for weight in args.weights:
                await router.set_weight(weight)
                await asyncio.sleep(args.hold_s)
                shares = slow_shares(stack.prometheus.url, int(args.hold_s - 5), "0.01")
                (pn, ps), (cn, cs) = shares["primary"], shares["canary"]
                print(f"| {weight}% | {pn} | {ps} | {cn} | {cs} |", flush=True)
            await router.set_weight(0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--weights", type=lambda s: [int(w) for w in s.split(",")], default=[10, 20, 50, 80]
    )
    parser.add_argument("--hold-s", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
