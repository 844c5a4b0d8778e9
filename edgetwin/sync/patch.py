"""JSON merge patches (RFC 7386) for Device status, and their composition.

The outbox keeps one pending patch per device and folds every later change into it, so
its size is bounded by the number of properties, not by time offline. Merge patches are
not closed under composition in general (an object written over a scalar cannot be said
as one merge patch), but status patches have a fixed shape: every key is always an object
or always a leaf, and objects are never deleted. Within that shape ``compose(a, b)``
applied once equals ``a`` then ``b`` applied in turn (tests/sync/test_patch.py checks it).
"""

from __future__ import annotations

from typing import Any

JSON = Any


def apply_patch(target: JSON, patch: JSON) -> JSON:
    """Apply merge ``patch`` to ``target`` and return the result; neither is mutated."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply_patch(result.get(key), value)
    return result


def compose(first: JSON, second: JSON) -> JSON:
    """One patch with the effect of ``first`` followed by ``second`` (for status-shaped
    patches, see the module docstring). Neither argument is mutated."""
    if not isinstance(first, dict) or not isinstance(second, dict):
        return second
    result = dict(first)
    for key, value in second.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = compose(result[key], value)
        else:
            result[key] = value
    return result


def compose_into(pending: dict[str, JSON], patch: dict[str, JSON]) -> None:
    """In-place :func:`compose` for the hot path: fold ``patch`` into ``pending``."""
    for key, value in patch.items():
        current = pending.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            # Copy before mutating so a caller's nested dict is never changed underneath it.
            merged = dict(current)
            compose_into(merged, value)
            pending[key] = merged
        else:
            pending[key] = value
