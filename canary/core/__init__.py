"""The pure core: the rollout and failover state machines and the record schema.

Nothing here awaits or does I/O: each machine is a function from (state, event, now) to
(new state, actions), table-tested. ``inputs`` is the one bounded YAML/JSON reader every
edge uses; ``redact`` keeps secrets out of what is written, and ``logs`` formats the log
(text or JSON lines). May import: ``analysis`` and the standard library, pydantic, PyYAML. Never:
aiohttp, kubernetes_asyncio, prometheus_api_client, or any other ``canary`` package.
"""
