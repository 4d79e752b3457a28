"""Runtime commands at once on one HAProxy admin socket: how many are lost.

    python -m benchmarks.haproxy_concurrency --counts 10,50,200,1000

Issue 13 saw 667 weight changes refused when 500 static rollouts started on one HAProxy: its
admin socket takes few connections at once (`stats maxconn`) and drops the rest. This starts a
real HAProxy (the demo's config) on loopback and sends N `show servers state` commands at once
through canary.routers.haproxy.runtime_command, which now keeps at most
MAX_COMMANDS_IN_FLIGHT per socket; `--in-flight 1000` shows what no limit did.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import canary.routers.haproxy as haproxy  # noqa: E402
from canary.demo.procs import HAProxyConfig, HAProxyProcess, free_port  # noqa: E402


async def main(args: argparse.Namespace) -> None:
    haproxy.MAX_COMMANDS_IN_FLIGHT = args.in_flight
    with tempfile.TemporaryDirectory(prefix="hap-") as tmp:
        work = Path(tmp)
        config = HAProxyConfig(
            frontend_port=free_port(),
            primary_addr="127.0.0.1:9",
            canary_addr="127.0.0.1:9",
            socket_path=work / "admin.sock",
            state_file=work / "state",
            backend="app",
        )
        process = HAProxyProcess(config, workdir=work)
        await process.start()
        try:
            print(f"in flight per socket: {args.in_flight}")
            print("| commands at once | lost | wall |")
            print("|---:|---:|---:|")
            for n in args.counts:
                started = time.perf_counter()
                results = await asyncio.gather(
                    *(
                        haproxy.runtime_command(
                            config.socket_path, "show servers state app", timeout_s=30
                        )
                        for _ in range(n)
                    ),
                    return_exceptions=True,
                )
                lost = sum(isinstance(r, BaseException) for r in results)
                print(f"| {n} | {lost} | {time.perf_counter() - started:.2f} s |", flush=True)
        finally:
            await process.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--counts", type=lambda s: [int(c) for c in s.split(",")], default=[10, 50, 200, 1000]
    )
    parser.add_argument("--in-flight", type=int, default=haproxy.MAX_COMMANDS_IN_FLIGHT)
    asyncio.run(main(parser.parse_args()))
