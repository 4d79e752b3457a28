"""`canary loadtest`: payload checks, the target allow-list, and the server against a real service.

The server runs as `python -m canary loadtest` (sys.executable) on a free loopback port and
sends load to the demo service (canary.demo.service, its own process), whose /metrics counts
what actually arrived. Every process is stopped by its PID.
"""

from __future__ import annotations

import json
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.pool import ProcessPool

from canary.cli.main import build_parser
from canary.demo.procs import HttpReady, ManagedProcess, free_port
from canary.loadtest import BadRequest, Limits, TargetPolicy, parse_duration, parse_payload

ROOT = Path(__file__).resolve().parents[2]
READY_S = 90.0  # starting Python with aiohttp on a busy 2-core CI machine can take 15 s
LIMITS = Limits(max_rps=100.0, max_duration_s=600.0)
POLICY = TargetPolicy.with_defaults(cidrs=["127.0.0.1/32"])


def payload(**metadata: Any) -> dict[str, Any]:
    meta = {"url": "http://app-canary.shop.svc:80/", "rps": "20", "duration": "1m"}
    meta.update(metadata)
    return {
        "name": "app",
        "namespace": "shop",
        "phase": "Progressing",
        "checksum": "abc",
        "type": "rollout",
        "metadata": {k: v for k, v in meta.items() if v is not None},
    }


# --- the payload ------------------------------------------------------------------------


def test_a_flagger_payload_becomes_a_load_request() -> None:
    """Strings as Flagger sends them: rate, Go-style duration, method; keyed by ns/name/url."""
    load = parse_payload(payload(method="head", duration="1m30s"), limits=LIMITS, policy=POLICY)
    assert (load.rps, load.duration_s, load.method, load.action) == (20.0, 90.0, "HEAD", "start")
    assert load.key == ("shop", "app", "http://app-canary.shop.svc:80/")
    stop = dict(payload(), type="post-rollout")
    assert parse_payload(stop, limits=LIMITS, policy=POLICY).action == "stop"
    # `at` is the controller planner's (where the load counts): accepted, nothing to send
    assert parse_payload(payload(at="canary"), limits=LIMITS, policy=POLICY).rps == 20.0


@pytest.mark.parametrize(
    ("body", "key", "status"),
    [
        (payload(rps="abc"), "metadata.rps", 400),
        (payload(rps="0"), "metadata.rps", 400),
        (payload(rps="101"), "metadata.rps", 400),
        (payload(rps="nan"), "metadata.rps", 400),
        (payload(rps=None), "metadata.rps", 400),
        (payload(duration="forever"), "metadata.duration", 400),
        (payload(duration="11m"), "metadata.duration", 400),
        (payload(duration="-5s"), "metadata.duration", 400),
        (payload(method="DELETE"), "metadata.method", 400),
        (payload(at="sideways"), "metadata.at", 400),
        (payload(url=None), "metadata.url", 400),
        (payload(url="ftp://app.shop.svc/"), "metadata.url", 400),
        (payload(url="http://user:pw@app.shop.svc/"), "metadata.url", 400),
        (payload(url="http://example.com/"), "metadata.url", 403),
        (payload(url="http://169.254.169.254/latest/"), "metadata.url", 403),
        (payload(url="http://10.0.0.1/"), "metadata.url", 403),
        (payload(cmd="hey -z 1m"), "metadata.cmd", 400),
        (dict(payload(), type="rollback"), "type", 400),
        (dict(payload(), metadata="x"), "metadata", 400),
        (dict(payload(), name=""), "name", 400),
        (dict(payload(), namespace="Bad_NS"), "namespace", 400),
        ([1, 2], "body", 400),
    ],
)
def test_bad_payloads_are_refused_naming_the_key(body: Any, key: str, status: int) -> None:
    """Every refusal says which key to fix; a target outside the allow-list is a 403."""
    with pytest.raises(BadRequest) as caught:
        parse_payload(body, limits=LIMITS, policy=POLICY)
    assert caught.value.key == key and caught.value.status == status
    assert str(caught.value).startswith(f"{key}: ")


def test_the_default_allow_list_is_cluster_service_names_only() -> None:
    """*.svc and *.svc.cluster.local by default; --allow-host patterns and CIDRs add to it."""
    default = TargetPolicy.with_defaults()
    assert default.refusal("app-canary.shop.svc") is None
    assert default.refusal("app-canary.shop.svc.cluster.local.") is None
    assert default.refusal("example.com") is not None
    assert default.refusal("svc") is not None
    assert default.refusal("127.0.0.1") is not None and default.refusal("[::1]") is not None
    custom = TargetPolicy.with_defaults(hosts=["*.internal.example"], cidrs=["10.96.0.0/12"])
    assert custom.refusal("shop.internal.example") is None
    assert custom.refusal("10.96.3.4") is None and custom.refusal("10.112.0.1") is not None
    assert custom.named_exactly("shop.internal.example") is False
    assert TargetPolicy.with_defaults(hosts=["app.internal"]).named_exactly("APP.internal.")


def test_durations_read_like_go_durations() -> None:
    """30s, 1m, 1m30s, 2h, 500ms and plain seconds; anything else is an error quoting it."""
    assert [parse_duration(t) for t in ("30s", "1m", "1m30s", "2h", "500ms", "45")] == [
        30.0,
        60.0,
        90.0,
        7200.0,
        0.5,
        45.0,
    ]
    for bad in ("", "1x", "m", "1m 30s", "0s", "inf"):
        with pytest.raises(ValueError):
            parse_duration(bad)


# --- the server, for real ---------------------------------------------------------------


def post(url: str, body: Any, token: str | None = None) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST")
    request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def served(service_url: str) -> float:
    """Requests the demo service answered so far (its own counter)."""
    text = get(f"{service_url}/metrics")
    return sum(
        float(m.group(1)) for m in re.finditer(r"^http_requests_total\{[^}]*\} (\S+)$", text, re.M)
    )


def loadtest_process(
    procs: ProcessPool, workdir: Path, *flags: str, loopback: bool = True
) -> tuple[ManagedProcess, str]:
    """`python -m canary loadtest` on a free port; `loopback`: --allow-cidr 127.0.0.1/32."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "canary", "loadtest", "--listen", f"127.0.0.1:{port}"]
    argv += ["--allow-cidr", "127.0.0.1/32"] if loopback else []
    process = procs.start(
        ManagedProcess(
            [*argv, *flags],
            log_path=workdir / f"loadtest-{port}.log",
            ready=HttpReady(f"{url}/healthz"),
            name="loadtest",
            cwd=ROOT,
            ready_timeout=READY_S,
        )
    )
    return process, url


@pytest.fixture
def procs(workdir: Path) -> Iterator[ProcessPool]:
    pool = ProcessPool(workdir)
    yield pool
    pool.stop_all()


def service(procs: ProcessPool, latency_ms: float = 5.0) -> str:
    """The demo service as the load's target; its /metrics counts what arrived."""
    port = free_port()
    argv = [sys.executable, "-m", "canary.demo.service", "--port", str(port)]
    argv += ["--version", "canary", "--latency-ms", str(latency_ms)]
    procs.start(
        ManagedProcess(
            argv,
            log_path=procs.logdir / f"service-{port}.log",
            ready=HttpReady(f"http://127.0.0.1:{port}/healthz"),
            name=f"service-{port}",
            cwd=ROOT,
            ready_timeout=READY_S,
        )
    )
    return f"http://127.0.0.1:{port}"


def wait_until_idle(loadtest: str, timeout_s: float = 20.0) -> dict[str, Any]:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        jobs = json.loads(get(f"{loadtest}/jobs"))["jobs"]
        if not jobs:
            return {}
        time.sleep(0.2)
    raise AssertionError(f"jobs still running after {timeout_s}s: {jobs}")


def test_repeated_calls_extend_one_job_at_the_asked_rate(procs: ProcessPool, workdir: Path) -> None:
    """Five calls for the same (namespace, name, url) within a second are one job (calls=5),
    not five generators: about rps x duration requests arrive at the service, all counted
    as ok on /metrics; a post-rollout hook then stops a second job at once."""
    target = service(procs)
    _, loadtest = loadtest_process(procs, workdir)
    body = payload(url=f"{target}/", rps="20", duration="3s")
    results = [post(f"{loadtest}/", body) for _ in range(5)]
    assert [r[1]["result"] for r in results] == ["started"] + ["extended"] * 4
    assert all(status == 200 for status, _ in results)
    (job,) = json.loads(get(f"{loadtest}/jobs"))["jobs"]
    assert job["calls"] == 5 and job["rps"] == 20.0 and job["url"] == f"{target}/"
    wait_until_idle(loadtest)
    arrived = served(target)
    # 20 req/s for ~3 s (extended by the time the five calls took): 60, never 5 x 60
    assert 50 <= arrived <= 80, arrived
    metrics = get(f"{loadtest}/metrics")
    ok = re.search(
        r'^canary_loadtest_requests_total\{name="app",namespace="shop",outcome="ok"\} (\S+)$',
        metrics,
        re.M,
    )
    assert ok is not None and float(ok.group(1)) == arrived
    assert 'canary_loadtest_webhooks_total{result="extended"} 4.0' in metrics

    long_body = payload(url=f"{target}/", rps="20", duration="10m")
    assert post(f"{loadtest}/", long_body)[1]["result"] == "started"
    time.sleep(0.5)
    stopped = post(f"{loadtest}/", dict(long_body, type="post-rollout"))
    assert stopped == (200, stopped[1]) and stopped[1]["result"] == "stopped"
    wait_until_idle(loadtest, timeout_s=5.0)


def test_a_slow_target_does_not_lower_the_rate(procs: ProcessPool, workdir: Path) -> None:
    """Open loop: at 500 ms per answer, 20 req/s for 3 s still sends ~60 requests (a closed
    loop with a few workers would send a handful); latency counts from the scheduled start."""
    target = service(procs, latency_ms=500.0)
    _, loadtest = loadtest_process(procs, workdir)
    status, answer = post(f"{loadtest}/", payload(url=f"{target}/", rps="20", duration="3s"))
    assert status == 200, answer
    wait_until_idle(loadtest)
    assert 50 <= served(target) <= 70
    metrics = get(f"{loadtest}/metrics")
    count = re.search(
        r"^canary_loadtest_request_duration_seconds_count\{[^}]*\} (\S+)$", metrics, re.M
    )
    total = re.search(
        r"^canary_loadtest_request_duration_seconds_sum\{[^}]*\} (\S+)$", metrics, re.M
    )
    assert count and total and float(total.group(1)) / float(count.group(1)) > 0.3


def test_limits_and_refusals_over_http(procs: ProcessPool, workdir: Path) -> None:
    """Bad metadata is a 4xx whose JSON names the key; a URL outside the allow-list is 403;
    --max-jobs answers 429; with --token-file a POST without the token is 401."""
    target = service(procs)
    token_file = workdir / "token"
    token_file.write_text("s3cret-token\n")
    _, loadtest = loadtest_process(
        procs, workdir, "--max-jobs", "1", "--token-file", str(token_file)
    )
    body = payload(url=f"{target}/", rps="5", duration="5s")
    assert post(f"{loadtest}/", body)[0] == 401
    status, answer = post(f"{loadtest}/", payload(url=f"{target}/", rps="lots"), "s3cret-token")
    assert status == 400 and answer["key"] == "metadata.rps"
    status, answer = post(f"{loadtest}/", payload(url="http://example.com/"), "s3cret-token")
    assert status == 403 and answer["key"] == "metadata.url"
    assert post(f"{loadtest}/", body, "s3cret-token")[0] == 200
    other = dict(body, name="other")
    status, answer = post(f"{loadtest}/", other, "s3cret-token")
    assert status == 429 and "--max-jobs" in answer["error"]


def test_a_name_resolving_to_loopback_is_refused_at_connect(
    procs: ProcessPool, workdir: Path
) -> None:
    """A name that passes the pattern check but resolves to loopback gets no load: the
    resolver refuses it (counted as errors), unless an allowed CIDR holds the address."""
    target = service(procs)
    port = target.rsplit(":", 1)[1]
    # "local*" is a pattern, not an exact name: "localhost" passes it but is not trusted as such
    _, loadtest = loadtest_process(
        procs, workdir, "--allow-host", "local*", "--allow-cidr", "::1/128"
    )
    body = payload(url=f"http://localhost:{port}/", rps="10", duration="1s")
    status, answer = post(f"{loadtest}/", body)
    assert status == 200, answer
    wait_until_idle(loadtest)
    # allowed by CIDR: 127.0.0.1/32 holds what x.localhost resolves to, so load arrives
    assert served(target) >= 5

    _, strict = loadtest_process(procs, workdir, "--allow-host", "local*", loopback=False)
    before = served(target)
    assert post(f"{strict}/", body)[0] == 200
    wait_until_idle(strict)
    assert served(target) == before
    metrics = get(f"{strict}/metrics")
    assert re.search(r'outcome="error"\} [1-9]', metrics), metrics


def test_sigterm_stops_every_job_and_exits_cleanly(procs: ProcessPool, workdir: Path) -> None:
    """SIGTERM while a 10-minute job runs: exit 0 within seconds, and no request arrives after."""
    target = service(procs)
    process, loadtest = loadtest_process(procs, workdir)
    assert post(f"{loadtest}/", payload(url=f"{target}/", rps="20", duration="10m"))[0] == 200
    time.sleep(1.0)
    assert process.stop_sync() == 0  # SIGTERM by PID, then a wait
    after = served(target)
    assert after > 5
    time.sleep(0.5)
    assert served(target) == after
    assert (
        "stopping: 1 load jobs"
        in (workdir / f"loadtest-{loadtest.rsplit(':', 1)[1]}.log").read_text()
    )


def test_the_cli_has_loadtest_with_help() -> None:
    """`canary loadtest --help` exists and bad flags exit 2 naming the flag."""
    parser = build_parser()
    args = parser.parse_args(["loadtest", "--allow-host", "*.shop", "--max-rps", "50"])
    assert args.allow_host == ["*.shop"] and args.max_rps == 50.0
    assert "loadtest" in parser.format_help()
    from canary.cli.main import main

    assert main(["loadtest", "--allow-cidr", "not-a-cidr"]) == 2
    assert main(["loadtest", "--timeout", "soon"]) == 2


def test_redirects_are_counted_not_followed(procs: ProcessPool, workdir: Path) -> None:
    """A target answering 302 to another server: every request is counted as `redirect`,
    and the server it points at gets nothing."""
    target = service(procs)
    port = free_port()
    procs.python(
        "redirect", Path(__file__).with_name("redirect_server.py"), port, f"{target}/", port=port
    )
    _, loadtest = loadtest_process(procs, workdir)
    body = payload(url=f"http://127.0.0.1:{port}/", rps="10", duration="1s")
    assert post(f"{loadtest}/", body)[0] == 200
    wait_until_idle(loadtest)
    assert served(target) == 0
    metrics = get(f"{loadtest}/metrics")
    redirects = re.search(r'outcome="redirect"\} (\S+)$', metrics, re.M)
    assert redirects is not None and float(redirects.group(1)) >= 8
    assert 'outcome="ok"' not in metrics


def test_a_stopped_job_restarts_fresh_and_big_bodies_are_refused(
    procs: ProcessPool, workdir: Path
) -> None:
    """post-rollout then rollout for the same key: a new job (calls 1), not the stopped one
    extended; a body over 64 KiB is a 413 naming `body`, and non-JSON a 400."""
    target = service(procs)
    _, loadtest = loadtest_process(procs, workdir)
    body = payload(url=f"{target}/", rps="5", duration="10m")
    assert post(f"{loadtest}/", body)[1]["result"] == "started"
    assert post(f"{loadtest}/", dict(body, type="post-rollout"))[1]["result"] == "stopped"
    again = post(f"{loadtest}/", body)[1]
    assert again["result"] == "started" and again["job"]["calls"] == 1
    (job,) = json.loads(get(f"{loadtest}/jobs"))["jobs"]
    assert job["calls"] == 1
    big = dict(body, checksum="x" * 70_000)
    status, answer = post(f"{loadtest}/", big)
    assert status == 413 and answer["key"] == "body"
    request = urllib.request.Request(f"{loadtest}/", data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=5)
    assert caught.value.code == 400 and json.loads(caught.value.read())["key"] == "body"
    assert post(f"{loadtest}/", dict(body, type="post-rollout"))[1]["result"] == "stopped"
