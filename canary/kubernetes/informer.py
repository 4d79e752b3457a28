"""Watch caches of the traffic objects and canary's Services: a tick's read-back costs no request.

Every rollout reads its weight back from its router on every tick. For the Kubernetes routers
that was a GET of the canary Ingress or HTTPRoute per tick: at 1,000 rollouts and 10 s ticks,
100-200 GETs a second, and ticks queued behind the client's in-flight slots (issue 13). An
`ObjectCache` lists and then watches one kind (Ingresses or HTTPRoutes) in the namespaces the
operator watches, as client-go's informers do, through `Kube`'s `_watch` (resumes from the last
resourceVersion, re-lists on 410), and routers read from it when it can be trusted:

- the cache has completed a list and its watch stream is open now (not re-listing, not
  backing off after an error, not between streams);
- and, for an object this process has written (or is writing), the cache has seen the
  resourceVersion the write returned. A read before that GETs, so the read-back after a weight
  change still proves that the API server holds it; the GET's own resourceVersion then becomes
  the one to wait for, which also settles writes whose answer was lost. Seen means held now,
  or applied by the watch while the write or the GET was in flight: the watch may have moved
  past the answer's version (the gateway controller writes an HTTPRoute's status right
  after ours) before the answer is looked at.

Otherwise `get` GETs, exactly as the routers did before. An object absent from a trusted cache
is NotFound, as a 404 would say. resourceVersions are compared for equality only (the API's
rule: they are opaque), which the watch's ordering makes enough: every change is delivered, in
order, unless the watch re-lists, after which one GET resolves the key again.

Changes by others (kubectl editing the canary weight) arrive through the watch, so the next
tick reads them as it would have with a GET, and the machine's drift handling sees them.

Services too: `ensure_services` (canary.kubernetes.workload) looked at app-primary and
app-canary with two GETs each time a rollout started or resumed, 2,084 GETs when a survivor
took a thousand rollouts over (issue 13). That cache holds only the Services canary manages
(`label_selector`), so an object absent from it may still exist without the label: a
selected cache answers an absent object with a GET, never NotFound.

Only what the routers read is kept: name, namespace, resourceVersion, generation, uid, labels,
annotations (but kubectl's last-applied copy of the whole object), spec, and for HTTPRoutes
the status; managedFields and the rest are dropped, so thousands of objects cost little.
Each is held as its compact JSON text (~0.5 KiB for an Ingress or a Service, ~3 KiB as
dicts: at 2,000 rollouts over 2 shards each replica caches 2,000 Ingresses and 4,000
Services, issue 13's 300 MiB), and a read decodes its own copy (~10 us, once a tick).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Callable, Hashable
from typing import Generic, Literal, TypeVar

from canary.kubernetes.client import JSON, Kube, KubeError, NotFound, Relist, WatchEvent

__all__ = ["CachedKind", "ObjectCache", "pack", "slim"]

log = logging.getLogger(__name__)

CachedKind = Literal["ingresses", "httproutes", "services"]

_KEPT_METADATA = ("name", "namespace", "resourceVersion", "generation", "uid", "labels")
_LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
# A pending write whose answer never came: no resourceVersion equals it, so the next read GETs.
_UNKNOWN = ""


def slim(obj: JSON, *, keep_status: bool) -> JSON:
    """The parts of an object the routers read (see the module's docstring)."""
    meta = obj.get("metadata") or {}
    kept: JSON = {k: meta[k] for k in _KEPT_METADATA if k in meta}
    annotations = meta.get("annotations")
    if annotations:
        kept["annotations"] = {k: v for k, v in annotations.items() if k != _LAST_APPLIED}
    out: JSON = {"metadata": kept, "spec": obj.get("spec") or {}}
    if keep_status and "status" in obj:
        out["status"] = obj["status"]
    return out


def pack(obj: JSON) -> bytes:
    """An object as held between events, here and by the operator: its compact JSON, a few
    KiB less than as dicts (issue 13's RSS)."""
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def _held(obj: JSON) -> tuple[str, bytes]:
    """An object as the cache holds it: its resourceVersion and its packed text."""
    return _rv(obj), pack(obj)


def _rv(obj: JSON) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


# Versions kept per key while a request for it is in flight: a request lasts a second or
# two, and an object changes a few times a second at most (ours, a controller's status).
_SEEN_KEPT = 16


def _remember(seen: list[str], resource_version: str) -> None:
    seen.append(resource_version)
    del seen[:-_SEEN_KEPT]


def _key(obj: JSON) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


class ObjectCache:
    """A list + watch cache of one kind in `namespace` (None: every namespace); `run` feeds it.

    Each object `get` returns is the caller's own copy."""

    def __init__(
        self,
        kube: Kube,
        resource: CachedKind,
        namespace: str | None = None,
        *,
        retry_s: float = 10.0,
        absent_retry_s: float = 60.0,
        watch_timeout_s: int = 300,
        label_selector: str | None = None,
    ) -> None:
        if not 0 < retry_s <= absent_retry_s:
            raise ValueError(
                f"need 0 < retry_s <= absent_retry_s, got {retry_s} and {absent_retry_s}"
            )
        self.kube = kube
        self.resource: CachedKind = resource
        self.namespace = namespace
        self.retry_s = retry_s
        # A kind the server does not serve (no HTTPRoute CRD) is asked about less often.
        self.absent_retry_s = absent_retry_s
        self.watch_timeout_s = watch_timeout_s
        self.label_selector = label_selector
        self._objects: dict[tuple[str, str], tuple[str, bytes]] = {}  # key -> _held()
        self._synced = False  # a list has been applied
        self._watching = False  # a watch stream is open now
        # key -> the resourceVersion the cache must see before it answers for that key.
        self._pending: dict[tuple[str, str], str] = {}
        # While a write or a GET of a key is in flight, the resourceVersions the watch applies
        # for it (the last _SEEN_KEPT): its answer's version may have come and gone (the
        # gateway controller writes an HTTPRoute's status right after our write) before the
        # answer is looked at, and the key would otherwise stay pending, every read a GET.
        self._in_flight: dict[tuple[str, str], int] = {}
        self._seen_during: dict[tuple[str, str], list[str]] = {}
        self.hits = 0  # reads answered by the cache
        self.gets = 0  # reads that went to the API server

    @property
    def trusted(self) -> bool:
        """Listed, and the watch running: the cache is as current as the watch."""
        return self._synced and self._watching

    def __len__(self) -> int:
        return len(self._objects)

    # ---- feeding ----------------------------------------------------------------------

    def _stream(self) -> AsyncGenerator[Relist | WatchEvent, None]:
        if self.resource == "services":
            return self.kube.watch_services(
                self.namespace,
                timeout_s=self.watch_timeout_s,
                on_stream=self.set_watching,
                label_selector=self.label_selector,
            )
        if self.resource == "ingresses":
            watch = self.kube.watch_ingresses
        else:
            watch = self.kube.watch_httproutes
        return watch(self.namespace, timeout_s=self.watch_timeout_s, on_stream=self.set_watching)

    async def run(self) -> None:
        """List and watch until cancelled. A failure leaves the cache untrusted (reads GET)
        and is retried after `retry_s`; each new kind of failure is logged once."""
        last_error = ""
        while True:
            pause = self.retry_s
            try:
                stream = self._stream()
                async with contextlib.aclosing(stream):
                    async for item in stream:
                        self.apply(item)
                        last_error = ""
                        del item  # a whole list is not held while a quiet watch waits
            except NotFound as exc:
                # Typically the HTTPRoute CRD is not installed: the routers GET as before.
                pause = self.absent_retry_s
                message = f"not served ({exc}); reads of {self.resource} go to the API server"
                if message != last_error:
                    log.info("watch cache of %s: %s", self.resource, message)
                last_error = message
            except KubeError as exc:
                message = f"{exc}; reads of {self.resource} go to the API server meanwhile"
                if message != last_error:
                    log.warning("watch cache of %s: %s", self.resource, message)
                last_error = message
            except Exception:
                # A bug here must not end the cache for good: reads GET, and it starts over.
                log.exception("watch cache of %s failed; starting over", self.resource)
            finally:
                self._watching = False
            await asyncio.sleep(pause)

    def set_watching(self, open_: bool) -> None:
        """The watch stream opened (True) or ended (False): `_watch`'s on_stream."""
        self._watching = open_

    def apply(self, item: Relist | WatchEvent) -> None:
        """One item of the list + watch stream."""
        keep_status = self.resource == "httproutes"
        if isinstance(item, Relist):
            self._objects = {_key(o): _held(slim(o, keep_status=keep_status)) for o in item.objects}
            self._synced = True
            for key, versions in self._seen_during.items():
                if key in self._objects:
                    _remember(versions, self._objects[key][0])
            for key in [k for k, rv in self._pending.items() if self._seen(k, rv)]:
                del self._pending[key]
            return
        key = _key(item.object)
        if item.type == "DELETED":
            self._objects.pop(key, None)
        else:
            held = self._objects[key] = _held(slim(item.object, keep_status=keep_status))
            during = self._seen_during.get(key)
            if during is not None:
                _remember(during, held[0])
            if key in self._pending and self._seen(key, self._pending[key]):
                del self._pending[key]

    def _seen(self, key: tuple[str, str], resource_version: str) -> bool:
        cached = self._objects.get(key)
        return cached is not None and cached[0] == resource_version

    # ---- the routers' side ------------------------------------------------------------

    def writing(self, namespace: str, name: str) -> None:
        """A write to the object is about to be sent: until `wrote` says what it returned
        (and the cache has seen that), reads GET. A write that fails leaves it so."""
        self._pending[(namespace, name)] = _UNKNOWN
        self._begin((namespace, name))

    def wrote(self, namespace: str, name: str, obj: JSON) -> None:
        """A write returned `obj`: reads GET until the cache has seen its resourceVersion."""
        key = (namespace, name)
        self._wait_for(key, _rv(obj))
        self._end(key)

    def _wait_for(self, key: tuple[str, str], resource_version: str) -> None:
        # Seen: held now, or applied since the request began (a version is only ever made
        # once, so one applied meanwhile is this answer's, not an older one's).
        if self._seen(key, resource_version) or resource_version in self._seen_during.get(key, ()):
            self._pending.pop(key, None)
        else:
            self._pending[key] = resource_version

    def _begin(self, key: tuple[str, str]) -> None:
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        self._seen_during.setdefault(key, [])

    def _end(self, key: tuple[str, str]) -> None:
        # Kept while another request is in flight and the key still waits; else dropped,
        # also for a write that failed (no `wrote`) once a later read has settled the key.
        left = self._in_flight.get(key, 0) - 1
        if left > 0 and key in self._pending:
            self._in_flight[key] = left
        else:
            self._in_flight.pop(key, None)
            self._seen_during.pop(key, None)

    def held(self, namespace: str, name: str) -> bytes | None:
        """The object's JSON text, as `get` would decode it from the cache, or None where
        `get` would not answer from the cache (not trusted, pending, not held). The same
        text object until the object changes, so a caller may keep what it read from it
        (the routers' weight read back every tick: issue 13)."""
        key = (namespace, name)
        if not self.trusted or key in self._pending:
            return None
        held = self._objects.get(key)
        if held is None:
            return None
        self.hits += 1
        return held[1]

    async def get(self, namespace: str, name: str) -> JSON:
        """The object from the cache when trusted for it, else from the API server (raising
        as `Kube` does); NotFound when a trusted cache of every object does not hold it."""
        key = (namespace, name)
        if self.trusted and key not in self._pending:
            held = self._objects.get(key)
            if held is not None:
                self.hits += 1
                decoded: JSON = json.loads(held[1])
                return decoded
            if self.label_selector is None:
                raise NotFound(f"{self.resource} {namespace}/{name} not found (watch cache)")
        self.gets += 1
        self._begin(key)
        try:
            if self.resource == "ingresses":
                obj = await self.kube.get_ingress(namespace, name)
            elif self.resource == "services":
                obj = await self.kube.get_service(namespace, name)
            else:
                obj = await self.kube.get_httproute(namespace, name)
        except NotFound:
            if key not in self._objects:
                self._pending.pop(key, None)  # the cache agrees: nothing there
            raise
        else:
            self._wait_for(key, _rv(obj))
        finally:
            self._end(key)
        return obj


_T = TypeVar("_T")


class HeldRead(Generic[_T]):
    """What a reader made of an object's cached text (ObjectCache.held), kept while the text
    is the same object and the reader's settings are the same: the routers read their
    weight back every tick of every rollout, and decoding it each time was ~1% of the
    controller's CPU at 1,000 rollouts (issue 13). A read that raises is not kept."""

    def __init__(self) -> None:
        # the text (held, so its id is not reused), the settings, what was read
        self._seen: tuple[bytes, Hashable, _T] | None = None
        self.reads = 0  # texts read (not answered from what was kept): tests

    def read(self, held: bytes, settings: Hashable, reader: Callable[[JSON], _T]) -> _T:
        seen = self._seen
        if seen is not None and seen[0] is held and seen[1] == settings:
            return seen[2]
        self.reads += 1
        value = reader(json.loads(held))
        self._seen = (held, settings, value)
        return value

    def forget(self) -> None:
        self._seen = None
