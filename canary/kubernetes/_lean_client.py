"""Loads kubernetes_asyncio.client without the ~700 generated models and ~60 unused APIs.

`import kubernetes_asyncio.client` runs a generated __init__ that imports every model and
API module (859 modules in 36.1.0): 71 MiB of RSS against 33 MiB for aiohttp alone, paid by
every controller (issue 13: 1,000 rollouts in 300 MiB). The controller never builds or
decodes a model (every call passes `_preload_content=False`), so `install()`, run before
anything imports the client, registers lean stand-ins for the three generated packages,
`kubernetes_asyncio.client`, `.client.api` and `.client.models`: their real directory as
`__path__`, so submodules import as usual, and a PEP 562 `__getattr__` that imports a name's
module on first use, from the name -> module table the real __init__ declares. Anyone asking
for `client.V1Deployment` or `client.models.V1Lease` still gets the real class, e.g.
`ApiClient.deserialize`, which looks models up by name.

If the client was already imported whole, that one is used. A layout this does not know
fails here, with `LeanClientError`, rather than as a half-loaded client later.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["USED", "LeanClientError", "install"]

CLIENT = "kubernetes_asyncio.client"

# What canary/kubernetes/client.py takes from the client: checked by install().
USED = (
    "ApiClient",
    "Configuration",
    "ApiException",
    "AppsV1Api",
    "CoreV1Api",
    "NetworkingV1Api",
    "CoordinationV1Api",
    "AutoscalingV2Api",
    "CustomObjectsApi",
    "AuthenticationV1Api",
    "AuthorizationV1Api",
)

# The generated __init__s are lines of `from kubernetes_asyncio.client.x.y import Name`.
_FROM_IMPORT = re.compile(r"^from (kubernetes_asyncio\.client[\w.]*) import (\w+)[ \t]*$", re.M)


class LeanClientError(ImportError):
    """kubernetes_asyncio's layout is not the one `install()` knows."""


def _lean_package(name: str, directory: Path) -> ModuleType:
    init = directory / "__init__.py"
    if not init.is_file():
        raise LeanClientError(f"{name}: no {init}; kubernetes_asyncio's layout changed")
    module = ModuleType(name, f"{name}, loaded lazily by canary.kubernetes._lean_client")
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(directory)]
    module.__spec__ = spec
    module.__path__ = [str(directory)]
    module.__package__ = name
    table: dict[str, str] = {}

    def names() -> dict[str, str]:
        # Read once, at the first name asked for: ~1,700 short strings.
        if not table:
            table.update((n, m) for m, n in _FROM_IMPORT.findall(init.read_text("utf-8")))
            if not table:
                raise LeanClientError(
                    f"{init} imports nothing; kubernetes_asyncio's layout changed"
                )
        return table

    def __getattr__(attr: str) -> Any:
        if attr == "__all__":  # for `from ... import *`, as the generated __init__ had
            return list(names())
        where = names().get(attr) if not attr.startswith("__") else None
        if where is None:
            # AttributeError lets `from package import submodule` import the submodule.
            raise AttributeError(f"module {name!r} has no attribute {attr!r}")
        value = getattr(importlib.import_module(where), attr)
        setattr(module, attr, value)  # the next access is a plain attribute
        return value

    def __dir__() -> list[str]:
        return sorted({*module.__dict__, *names()})

    module.__getattr__ = __getattr__  # type: ignore[method-assign]
    module.__dir__ = __dir__  # type: ignore[method-assign]
    return module


def install() -> None:
    """Registers the lean client packages, unless the client is imported already, and
    checks that every name in USED resolves to a class."""
    if CLIENT not in sys.modules:
        found = importlib.util.find_spec("kubernetes_asyncio")  # finds, does not import
        if found is None or not found.submodule_search_locations:
            raise LeanClientError("kubernetes_asyncio is not installed as a package")
        root = Path(next(iter(found.submodule_search_locations))) / "client"
        client = _lean_package(CLIENT, root)
        api = _lean_package(f"{CLIENT}.api", root / "api")
        models = _lean_package(f"{CLIENT}.models", root / "models")
        # All three before any submodule: api_client.py imports the models package.
        sys.modules[CLIENT] = client
        sys.modules[f"{CLIENT}.api"] = api
        sys.modules[f"{CLIENT}.models"] = models
        client.api = api  # type: ignore[attr-defined]
        client.models = models  # type: ignore[attr-defined]
        # The package next, as `import kubernetes_asyncio.client` would: api_client.py's
        # `import kubernetes_asyncio.client.models` runs it, and its config imports ApiClient.
        package = importlib.import_module("kubernetes_asyncio")
        client.__version__ = getattr(package, "__version__", "")  # type: ignore[attr-defined]
    client = sys.modules[CLIENT]
    for name in USED:
        try:
            value = getattr(client, name)
        except (AttributeError, ImportError) as exc:
            raise LeanClientError(
                f"{CLIENT}.{name} does not load ({exc}); kubernetes_asyncio's layout changed"
            ) from exc
        if not isinstance(value, type):
            raise LeanClientError(f"{CLIENT}.{name} is {value!r}, not a class")
