"""The subset of Kubernetes JSONPath that CRD printer columns use, evaluated as
kube-apiserver's table converter does: ``.a.b``, ``['a.b']``, ``[N]``, ``[*]``, and
filters ``[?(@.type=="Ready")]`` (``==`` and ``!=`` against a string or number).
A column shows the first result only, exactly as the API server does."""

from __future__ import annotations

import json
import re
from typing import Any

_TOKEN = re.compile(
    r"""\.(?P<name>[A-Za-z0-9_$-]+)
      | \[\s*'(?P<quoted>[^']*)'\s*\]
      | \[\s*(?P<index>-?\d+)\s*\]
      | \[\s*\*\s*\]
      | \[\s*\?\(\s*@(?P<fpath>(?:\.[A-Za-z0-9_$-]+)+)\s*(?P<op>==|!=)\s*
          (?P<value>"[^"]*"|'[^']*'|-?\d+(?:\.\d+)?)\s*\)\s*\]
    """,
    re.X,
)


class JsonPathError(ValueError):
    """A path outside the supported subset."""


def compile_path(text: str) -> list[tuple[str, Any]]:
    """Parse ``text`` (with or without ``{}``) into steps; raises :class:`JsonPathError`."""
    body = text.strip()
    if body.startswith("{") and body.endswith("}"):
        body = body[1:-1]
    if not body.startswith("."):
        raise JsonPathError(f"a printer column path starts with '.': {text!r}")
    steps: list[tuple[str, Any]] = []
    pos = 0
    while pos < len(body):
        m = _TOKEN.match(body, pos)
        if m is None:
            raise JsonPathError(f"unsupported JSONPath at {body[pos:]!r} in {text!r}")
        if m.group("name") is not None:
            steps.append(("key", m.group("name")))
        elif m.group("quoted") is not None:
            steps.append(("key", m.group("quoted")))
        elif m.group("index") is not None:
            steps.append(("index", int(m.group("index"))))
        elif m.group("op") is not None:
            raw = m.group("value")
            value: Any = raw[1:-1] if raw[0] in "\"'" else json.loads(raw)
            steps.append(("filter", (m.group("fpath")[1:].split("."), m.group("op"), value)))
        else:
            steps.append(("all", None))
        pos = m.end()
    return steps


def find(obj: Any, text: str) -> list[Any]:
    """Every value ``text`` selects in ``obj``, in document order."""
    current = [obj]
    for kind, arg in compile_path(text):
        found: list[Any] = []
        for value in current:
            if kind == "key":
                if isinstance(value, dict) and arg in value:
                    found.append(value[arg])
            elif kind == "index":
                if isinstance(value, list) and -len(value) <= arg < len(value):
                    found.append(value[arg])
            elif kind == "all":
                if isinstance(value, list):
                    found.extend(value)
                elif isinstance(value, dict):
                    found.extend(value.values())
            else:
                path, op, want = arg
                items = value if isinstance(value, list) else []
                for item in items:
                    got: Any = item
                    for key in path:
                        got = got.get(key) if isinstance(got, dict) else None
                    if got is not None and (got == want) == (op == "=="):
                        found.append(item)
        current = found
    return current


def render(value: Any) -> str:
    """A value as the JSONPath printer writes it: strings bare, the rest as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value, separators=(",", ":"))
