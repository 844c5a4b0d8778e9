"""Validation problems worded for people and placed in their file: every problem of a
pydantic validation (not only the first), key paths in one style
(``spec.properties[0].type``), "did you mean" for unknown keys, and the line and column
of each key in the YAML text it came from (from the parser's marks)."""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

MAX_PROBLEMS = 20  # listed per file; the rest are counted


@dataclass(frozen=True)
class Problem:
    """One thing wrong: where (key path, and line/column when the text is known) and what."""

    path: str
    message: str
    line: int | None = None  # 1-based
    column: int | None = None  # 1-based
    subject: str = ""  # the object it is about, e.g. "Device plant/boiler-1"
    suggestion: str = ""  # for an unknown key: the path of the known key it is closest to

    def text(self, source: str = "") -> str:
        """``source:line:column: subject: path: message``, leaving out what is not known."""
        where = source
        if self.line is not None:
            where = f"{where}:{self.line}:{self.column}" if where else f"line {self.line}:{self.column}"
        parts = [x for x in (where, self.subject, self.path) if x]
        return ": ".join([*parts, self.message])

    def at(self, node: yaml.Node | None, loc: Sequence[Any]) -> Problem:
        """This problem placed at ``loc`` in the YAML node tree ``node``."""
        if node is None:
            return self
        mark = _mark(node, loc)
        return Problem(self.path, self.message, mark.line + 1, mark.column + 1, self.subject, self.suggestion)


def key_path(loc: Sequence[Any]) -> str:
    """``("spec", "properties", 0, "type")`` -> ``spec.properties[0].type``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def parse_path(path: str) -> list[Any]:
    """``spec.properties[0].type`` -> ``["spec", "properties", 0, "type"]``."""
    return [int(k) if k.isdigit() else k for k in path.replace("[", ".").replace("]", "").split(".") if k]


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _model_at(cls: Any, loc: Sequence[Any]) -> type[BaseModel] | None:
    """The pydantic model class found at ``loc`` under ``cls``, following fields, list
    items and dict values (Optional and unions taken as their model member)."""
    current = _unwrap(cls)
    for part in loc:
        if isinstance(current, tuple):  # a list or dict: ``part`` is an index or a key
            current = current[1]
            continue
        if not _is_model(current):
            return None
        fields = current.model_fields
        field = fields.get(str(part)) or next((f for f in fields.values() if f.alias == part), None)
        if field is None:
            return None
        current = _unwrap(field.annotation)
    return current if _is_model(current) else None


def _unwrap(tp: Any) -> Any:
    """A model class, ``("list", item)`` / ``("dict", value)``, or what it was."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        for member in members:
            found = _unwrap(member)
            if isinstance(found, tuple) or _is_model(found):
                return found
        return members[0] if members else tp
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(tp)[0])
    if origin in (list, tuple, set, frozenset, Sequence):
        args = typing.get_args(tp)
        return ("list", _unwrap(args[0]) if args else None)
    if origin is dict:
        args = typing.get_args(tp)
        return ("dict", _unwrap(args[1]) if len(args) == 2 else None)
    return tp


def _known_keys(cls: Any, parent: Sequence[Any]) -> list[str]:
    model = _model_at(cls, parent)
    if model is None:
        return []
    return [field.alias or name for name, field in model.model_fields.items()]


def _loc(loc: Sequence[Any]) -> list[Any]:
    """A pydantic error location without its validator steps (``function-after[...]``)."""
    return [p for p in loc if not (isinstance(p, str) and p.startswith("function-"))]


def problems_of(
    exc: ValidationError, cls: Any = None, unknown: str = "is not a known field"
) -> list[Problem]:
    """Every error of a validation, worded for people: missing keys are "required",
    unknown keys say so with the closest known key of ``cls`` at that place."""
    out: list[Problem] = []
    for err in exc.errors():
        out.append(_problem(err, cls, unknown))
    return out


def _problem(err: Any, cls: Any, unknown: str) -> Problem:
    loc = _loc(err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    suggestion = ""
    if err["type"] == "missing":
        msg = "is required"
    elif err["type"] == "extra_forbidden":
        msg = unknown
        if cls is not None and loc:
            close = difflib.get_close_matches(str(loc[-1]), _known_keys(cls, loc[:-1]), n=1, cutoff=0.6)
            if close:
                suggestion = key_path([*loc[:-1], close[0]])
                msg += f"; did you mean {close[0]}?"
    elif isinstance(err.get("input"), str | int | float) and not isinstance(err.get("input"), bool):
        shown = repr(err["input"])
        if len(shown) <= 40 and shown not in msg:
            msg = f"{msg}, got {shown}"
    return Problem(key_path(loc), msg, suggestion=suggestion)


def _mark(node: yaml.Node, loc: Sequence[Any]) -> Any:
    mark = node.start_mark
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if getattr(key_node, "value", None) == str(part):
                    mark, node = key_node.start_mark, value_node
                    break
            else:
                return mark  # missing: where its mapping starts
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            mark = node.start_mark
        else:
            return mark
    return mark


def locate_errors(
    exc: ValidationError, cls: Any, root: yaml.Node | None, unknown: str = "is not a known field"
) -> list[Problem]:
    """:func:`problems_of`, placed in ``root`` (a composed YAML document)."""
    errors = exc.errors()
    found = problems_of(exc, cls, unknown)
    placed = [problem.at(root, _loc(err["loc"])) for problem, err in zip(found, errors, strict=True)]
    # A required key reported missing because it was misspelt is said once, at the typo.
    typos = {p.suggestion for p in found if p.suggestion}
    kept = [p for p in placed if not (p.message == "is required" and p.path in typos)]
    return sorted(kept, key=lambda p: (p.line or 0, p.column or 0))


def compose_all(text: str) -> list[yaml.Node | None]:
    """The node trees of a YAML text's documents (for their marks), [] if unparsable."""
    try:
        return list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError:
        return []


def report(problems: list[Problem], source: str = "") -> str:
    """The problems one per line (the first :data:`MAX_PROBLEMS`, then how many more)."""
    lines = [p.text(source) for p in problems[:MAX_PROBLEMS]]
    if len(problems) > MAX_PROBLEMS:
        lines.append(f"... and {len(problems) - MAX_PROBLEMS} more problems")
    return "\n".join(lines)
