"""YAML as people mean it: a key given twice in one mapping is an error naming the key
and its line, not a silent "last one wins" (a second ``node:`` or ``spec:`` would
otherwise serve another node's devices, or none)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import yaml


class DuplicateKeyError(yaml.YAMLError):
    pass


class _StrictLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base constructor reports it
                continue
            if first is not None:
                raise DuplicateKeyError(f"key {key!r} given twice (lines {first} and {line})")
            seen[key] = line
        return super().construct_mapping(node, deep)


def safe_load(text: str) -> Any:
    return yaml.load(text, Loader=_StrictLoader)


def safe_load_all(text: str) -> Iterator[Any]:
    return yaml.load_all(text, Loader=_StrictLoader)


__all__ = ["DuplicateKeyError", "safe_load", "safe_load_all"]
