"""Checks against the official ``openai`` SDK's own types, stricter than the SDK itself.

The SDK reads what a server sends without validating it; these helpers
validate it (pydantic, strict), then walk the validated tree and require
that every model got every field its type marks required, and that no model
got a field its type does not know, unless the test allows it by name. The
second check is what catches a misspelt optional field, which the SDK would
silently keep as an extra.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, TypeAdapter

T = TypeVar("T")

# Fields the bridge sends that the SDK's types do not declare, by model class name.
# ``store`` is in OpenAI's response object, only not in the SDK's type.
KNOWN_EXTRAS: Mapping[str, frozenset[str]] = {"Response": frozenset({"store"})}


def problems(
    value: object, path: str = "$", extras: Mapping[str, frozenset[str]] = KNOWN_EXTRAS
) -> list[str]:
    """Required fields missing and unknown fields present, anywhere in a validated tree."""
    found: list[str] = []
    if isinstance(value, BaseModel):
        cls = type(value)
        for name, info in cls.model_fields.items():
            if info.is_required() and name not in value.model_fields_set:
                found.append(f"{path}.{name}: required by {cls.__name__}, missing")
        allowed = extras.get(cls.__name__, frozenset())
        for name in (value.model_extra or {}).keys() - allowed:
            found.append(f"{path}.{name}: not a field of {cls.__name__}")
        for name in value.model_fields_set & cls.model_fields.keys():
            found += problems(getattr(value, name), f"{path}.{name}", extras)
    elif isinstance(value, list | tuple):
        for index, element in enumerate(value):
            found += problems(element, f"{path}[{index}]", extras)
    elif isinstance(value, dict):
        for key, element in value.items():
            found += problems(element, f"{path}.{key}", extras)
    return found


def validate(type_: type[T] | Any, obj: Any) -> T:
    """``obj`` as the SDK type ``type_`` (a model or a union), strictly; AssertionError if not."""
    validated: T = TypeAdapter(type_).validate_python(obj, strict=True)
    found = problems(validated)
    assert not found, "\n".join(found)
    return validated
