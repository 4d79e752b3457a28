"""The emulator's own patch semantics (RFC 7386 merge patch, RFC 6902 JSON patch)."""

from __future__ import annotations

from typing import Any

import pytest
from support.kube_emulator import json_patch, merge_patch


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
