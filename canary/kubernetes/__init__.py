"""Kubernetes: annotated Deployments roll out by themselves (`canary kubernetes`).

``client`` is the only module that imports kubernetes_asyncio (one HTTP seam, retries,
watches, leader election, Events; ``_lean_client`` loads only the parts of it used); ``spec`` reads the ``canary.dev/`` annotations;
``record_store`` keeps records in ConfigMaps (the runner's RecordSink); ``workload`` owns
app-primary and the Services (the runner's Workload); ``operator`` is the supervisor that
watches Deployments, elects a leader and starts one runner per rollout, with the status
annotation as the runner's StateStore; ``commands`` is a client's side of the
annotations (send a manual command, find a rollout's record). May import:
``canary.core``, ``canary.runner``, ``canary.routers``, ``canary.metrics``,
``canary.notify``, ``canary.server``, ``analysis``.
"""
