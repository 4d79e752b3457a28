"""Static targets: services on hosts or VMs described by a YAML file (`canary run`).

``config`` reads and validates the file; the supervisor builds one runner per target with
the HAProxy router, the Prometheus source and file-backed state and record. May import:
``canary.core``, ``canary.runner``, ``canary.routers``, ``canary.metrics``,
``canary.notify``, ``analysis``.
"""
