"""Two clusters: a primary and a canary cluster that is also the standby.

``topology`` reads the topology file; ``health`` probes entry points; ``failover_controller``
runs the pure failover machine (``canary.core.failover``); ``multicluster`` is the
supervisor: cross-cluster rollouts through the one runner, failover beside them, and the
/failover routes (the `canary clusters` / `failover` / `failback` commands are in
``canary.cli.clusters``). May import everything below the entry points: ``canary.core``,
``canary.runner``, ``canary.routers``, ``canary.metrics``, ``canary.kubernetes.client``,
``canary.notify``, ``canary.server``, ``canary.reports``.
"""
