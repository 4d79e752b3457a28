"""The emulator's own semantics: patches (RFC 7386 merge patch, RFC 6902 JSON patch) and
label selectors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.kube import FAST_RETRY
from support.kube_emulator import KubeEmulator, json_patch, merge_patch

from canary.kubernetes.client import Kube, Relist, WatchEvent


def test_merge_patch_merges_objects_replaces_lists_and_deletes_nulls() -> None:
    """Objects merge key by key, lists are replaced whole, null deletes."""
    target: dict[str, Any] = {"a": {"b": 1, "c": 2}, "l": [1, 2], "gone": 1}
    assert merge_patch(target, {"a": {"c": 3}, "l": [9], "gone": None}) == {
        "a": {"b": 1, "c": 3},
        "l": [9],
    }
    assert target["a"]["c"] == 2  # the input is not modified


def test_json_patch_operations() -> None:
    """add, replace, remove, test, move and copy, with ~1 escaping in paths."""
    doc = {"metadata": {"annotations": {"a/b": "1"}}, "items": [1, 2]}
    out = json_patch(
        doc,
        [
            {"op": "test", "path": "/metadata/annotations/a~1b", "value": "1"},
            {"op": "replace", "path": "/metadata/annotations/a~1b", "value": "2"},
            {"op": "add", "path": "/items/-", "value": 3},
            {"op": "remove", "path": "/items/0"},
            {"op": "copy", "from": "/items", "path": "/copied"},
            {"op": "move", "from": "/copied", "path": "/moved"},
        ],
    )
    assert out == {"metadata": {"annotations": {"a/b": "2"}}, "items": [2, 3], "moved": [2, 3]}


def test_json_patch_failed_test_is_rejected() -> None:
    """A failing `test` op rejects the whole patch (the API server answers 422)."""
    with pytest.raises(Exception, match="test failed"):
        json_patch({"a": 1}, [{"op": "test", "path": "/a", "value": 2}])


def _service(name: str, **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "shop", "labels": labels}, "spec": {}}


async def test_a_label_selector_filters_lists_and_watches_as_the_api_server_does(
    tmp_path: Path,
) -> None:
    """`labelSelector` (equality and set requirements) filters a list, and a watch's events
    as the API server's watch cache does: an object that comes to match is ADDED, one that
    stops matching is DELETED (its previous content, at the new resourceVersion), changes
    to one that never matches are not seen; a bad selector is answered 400."""
    async with KubeEmulator() as emulator:
        emulator.put("", "v1", "services", _service("a", managed="canary", tier="web"))
        emulator.put("", "v1", "services", _service("b", tier="web"))
        emulator.put("", "v1", "services", _service("c", managed="other"))
        config = emulator.write_kubeconfig(tmp_path / "kc", token="t", context="test")
        kube = await Kube.connect(kubeconfig=str(config), context="test", retry=FAST_RETRY)
        try:
            stream = kube.watch_services("shop", label_selector="managed=canary")
            relist = await anext(stream)
            assert isinstance(relist, Relist)
            assert [o["metadata"]["name"] for o in relist.objects] == ["a"]
            stale = emulator.get("", "v1", "services", "shop", "a")
            emulator.put("", "v1", "services", _service("b", tier="web", managed="canary"))
            emulator.put("", "v1", "services", _service("c", managed="still-other"))
            emulator.put("", "v1", "services", _service("a", tier="web"))
            added, deleted = await anext(stream), await anext(stream)
            assert isinstance(added, WatchEvent) and isinstance(deleted, WatchEvent)
            assert (added.type, added.object["metadata"]["name"]) == ("ADDED", "b")
            assert deleted.type == "DELETED"
            assert deleted.object["metadata"]["labels"] == stale["metadata"]["labels"]
            now = emulator.get("", "v1", "services", "shop", "a")["metadata"]
            assert deleted.object["metadata"]["resourceVersion"] == now["resourceVersion"]
            emulator.delete("", "v1", "services", "shop", "b")
            gone = await anext(stream)
            assert isinstance(gone, WatchEvent) and gone.type == "DELETED"
            assert gone.object["metadata"]["name"] == "b"
            await stream.aclose()

            async with aiohttp.ClientSession() as http:
                url = f"{emulator.url}/api/v1/namespaces/shop/services"
                headers = {"Authorization": "Bearer t"}
                for selector, names in [
                    ("tier in (web, api),!managed", ["a"]),
                    ("managed notin (canary)", ["a", "c"]),
                    ("managed", ["c"]),
                    ("managed!=still-other,tier==web", ["a"]),
                ]:
                    params = {"labelSelector": selector}
                    async with http.get(url, params=params, headers=headers) as answer:
                        items = (await answer.json())["items"]
                    assert [i["metadata"]["name"] for i in items] == names, selector
                params = {"labelSelector": "bad key=1"}
                async with http.get(url, params=params, headers=headers) as answer:
                    assert answer.status == 400
        finally:
            await kube.close()
