"""The fields a newer canary wrote into something this one saved: named, not fatal.

Why: what canary saves (a Deployment's status annotation, static mode's state file) is read
back by whatever version runs next, and a downgrade is how an operator backs out of a bad
upgrade. Saved models ignore the fields they do not know, as Kubernetes does, so a
downgrade carries the rollout on instead of starting it over; `unknown_fields` names those
fields for the warning that says some of the saved state was set aside.
"""

from __future__ import annotations

import typing

from pydantic import BaseModel

from canary.core.inputs import clip

__all__ = ["unknown_fields"]

# Anyone who may edit the saved text may fill it with keys: the warning names a few.
MAX_NAMED = 20
MAX_PATH_CHARS = 100


def unknown_fields(model: type[BaseModel], data: object, *, prefix: str = "") -> list[str]:
    """The keys of `data` (parsed JSON) that `model` has no field for, and those of the
    models its fields hold, as dotted paths (`rollout.history[0].why`): at most MAX_NAMED,
    each clipped."""
    into: list[str] = []
    _unknown(model, data, prefix, into)
    return [clip(path, MAX_PATH_CHARS) for path in into[:MAX_NAMED]]


def _unknown(model: type[BaseModel], data: object, prefix: str, into: list[str]) -> None:
    if not isinstance(data, dict):
        return
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            into.append(prefix + str(key))
            continue
        held = _held_model(field.annotation)
        if held is None:
            continue
        inner, kind = held
        if kind == "one":
            _unknown(inner, value, f"{prefix}{key}.", into)
        elif kind == "map" and isinstance(value, dict):
            for name, each in value.items():
                _unknown(inner, each, f"{prefix}{key}.{name}.", into)
        elif kind == "seq" and isinstance(value, list):
            for index, each in enumerate(value):
                _unknown(inner, each, f"{prefix}{key}[{index}].", into)


def _held_model(annotation: object) -> tuple[type[BaseModel], str] | None:
    """The model a field's type holds and how: "one" (`M`, `M | None`), "seq"
    (`tuple[M, ...]`, `list[M]`) or "map" (`dict[str, M]`); None for any other type."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, "one"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (dict, tuple, list):
        held = _held_model(args[-1] if origin is dict else args[0]) if args else None
        if held is None or held[1] != "one":
            return None
        return held[0], "map" if origin is dict else "seq"
    return next((h for a in args if (h := _held_model(a)) is not None and h[1] == "one"), None)
