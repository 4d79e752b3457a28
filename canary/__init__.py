"""canary: a traffic-splitting canary controller.

The packages, from the pure centre outwards (each one's ``__init__`` says what it owns and
what it may import; ``tests/test_layout.py`` checks that no module imports one that imports
it back):

    core/        pure state: the rollout machine, the failover machine, the record schema
    runner/      the one rollout runner, its seams (Protocols) and the file-backed adapters
    routers/     where traffic weights go: HAProxy, ingress-nginx, Gateway API, PowerDNS, ...
    metrics/     where the counts come from: Prometheus
    notify/      who is told: chat webhooks
    static/      supervisor for targets described in a YAML file (`canary run`)
    kubernetes/  supervisor for annotated Deployments (`canary kubernetes`) and its adapters
    clusters/    two clusters: topology, health, failover and cross-cluster rollouts
    reports/     record -> report model -> Markdown, HTML, JSON, charts
    server/      the HTTP server (probes, /metrics, /rollouts, commands)
    cli/         the `canary` command line
    demo/        `canary demo`: a whole rollout on one machine with real servers

Beside the packages, two small modules that any of them may use and that import nothing
else from canary: ``retry`` (the one retry helper, on stamina) and ``dnsquery`` (one DNS
question to one server, on dnspython).

Statistics live beside this package, in ``analysis/``.
"""
