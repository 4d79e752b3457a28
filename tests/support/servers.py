"""Tiny servers the tests run as real processes (via sys.executable), stdlib + prometheus-client.

- `name PORT NAME`: answers every GET with its NAME, so a test can count where HAProxy sent
  each request.
- `exporter PORT`: a Prometheus exporter whose counters a test advances over HTTP
  (`GET /inc?version=V&code=C&n=N&seconds=S`), plus one series that is always NaN, so the
  metrics provider is tested against samples Prometheus really scraped.

Separate processes, not threads in the test, because the exporter must be restarted to
reset its counters, exactly as a redeployed service would.
"""

from __future__ import annotations

import argparse
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

BUCKETS = (0.05, 0.1, 0.5, 1.0)


def serve_name(port: int, name: str) -> ThreadingHTTPServer:
    body = name.encode() + b"\n"

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes; without this, Nagle + delayed ACK add ~40 ms.
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return ThreadingHTTPServer(("127.0.0.1", port), Handler)


def serve_exporter(port: int) -> ThreadingHTTPServer:
    registry = CollectorRegistry()
    requests = Counter("http_requests", "Requests.", ["version", "code"], registry=registry)
    latency = Histogram(
        "http_request_duration_seconds", "Latency.", ["version"], buckets=BUCKETS, registry=registry
    )
    nan_lines = (
        b'broken_requests_total{version="primary"} NaN\nbroken_requests_total{version="canary"} 1\n'
    )

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes; without this, Nagle + delayed ACK add ~40 ms.
        disable_nagle_algorithm = True

        def _answer(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            url = urlparse(self.path)
            if url.path == "/metrics":
                self._answer(200, generate_latest(registry) + nan_lines, CONTENT_TYPE_LATEST)
            elif url.path == "/inc":
                args = {k: v[0] for k, v in parse_qs(url.query).items()}
                try:
                    version, code = args["version"], args.get("code", "200")
                    n, seconds = int(args.get("n", "1")), float(args.get("seconds", "0.01"))
                except (KeyError, ValueError) as exc:
                    self._answer(400, f"bad /inc query: {exc}\n".encode())
                    return
                requests.labels(version=version, code=code).inc(n)
                for _ in range(n):
                    latency.labels(version=version).observe(seconds)
                self._answer(200, b"ok\n")
            else:
                self._answer(404, b"not found\n")

        def log_message(self, format: str, *args: object) -> None:
            pass

    return ThreadingHTTPServer(("127.0.0.1", port), Handler)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="servers.py")
    sub = parser.add_subparsers(dest="kind", required=True)
    name = sub.add_parser("name")
    name.add_argument("port", type=int)
    name.add_argument("name")
    exporter = sub.add_parser("exporter")
    exporter.add_argument("port", type=int)
    args = parser.parse_args(argv)
    server = serve_name(args.port, args.name) if args.kind == "name" else serve_exporter(args.port)

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
