"""What kube-apiserver does with a custom resource's body against its CRD's structural
OpenAPI v3 schema, for the API emulator, in the server's order:

1. pruning: fields the schema does not declare are dropped (unless the object is marked
   ``x-kubernetes-preserve-unknown-fields``) and reported, so the caller can refuse them
   (``fieldValidation=Strict``) or warn (the default, ``Warn``); a ``null`` where the
   schema does not say ``nullable: true`` is dropped too;
2. defaulting (``default``);
3. validation: ``type``, ``required``, ``enum``, ``pattern``, ``format: date-time``,
   ``minLength``/``maxLength``, ``minimum``/``maximum``, ``minItems``/``maxItems``,
   ``maxProperties``, ``x-kubernetes-int-or-string``, unique keys of
   ``x-kubernetes-list-type: map`` and items of ``set``; then the CEL rules of
   ``x-kubernetes-validations`` (``self``; ``oldSelf`` rules only on updates), with the
   ``cel-python`` package (``pip install 'edgetwin[emulator]'``).

Errors read like the API server's field errors (``spec.nodeName: Required value``).
``metadata`` is the server's own (ObjectMeta) and is left alone.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from typing import Any

_DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
_TOP_LEVEL = ("apiVersion", "kind", "metadata")


class SchemaError(ValueError):
    """A CRD schema the emulator cannot serve (as the API server refuses such a CRD)."""


@dataclass(frozen=True)
class FieldError:
    """One field error, as in a Status's ``details.causes``."""

    field: str
    reason: str  # FieldValueRequired, FieldValueInvalid, ...
    detail: str

    def __str__(self) -> str:
        return f"{self.field}: {self.detail}"


@dataclass
class Admission:
    """The body as stored (pruned, defaulted), the fields pruned, the errors."""

    obj: dict[str, Any]
    unknown: list[str] = field(default_factory=list)
    errors: list[FieldError] = field(default_factory=list)


def _quote(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return '"object"' if isinstance(value, dict) else '"array"' if isinstance(value, list) else '"null"'


def _invalid(path: str, value: Any, detail: str) -> FieldError:
    return FieldError(path, "FieldValueInvalid", f"Invalid value: {value}: {path} in body {detail}")


def _type_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _fits(value: Any, kind: str) -> bool:
    actual = _type_of(value)
    return actual == kind or (kind == "number" and actual == "integer")


class Schema:
    """A CRD version's ``openAPIV3Schema``, ready to admit bodies."""

    def __init__(self, schema: dict[str, Any]) -> None:
        self.schema = schema
        self._programs: dict[str, Any] = {}
        self._compile_rules(schema, "")

    # ----------------------------------------------------------------- CEL
    def _compile_rules(self, node: dict[str, Any], where: str) -> None:
        for rule in node.get("x-kubernetes-validations") or ():
            self._program(rule["rule"], where)
        for name, sub in (node.get("properties") or {}).items():
            self._compile_rules(sub, f"{where}.{name}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                self._compile_rules(node[key], f"{where}[*]")

    def _program(self, rule: str, where: str = "") -> Any:
        program = self._programs.get(rule)
        if program is None:
            try:
                import celpy
            except ImportError as exc:  # pragma: no cover - the dev install has it
                raise SchemaError(
                    "this CRD has x-kubernetes-validations; checking them needs the cel-python "
                    "package: pip install 'edgetwin[emulator]'"
                ) from exc
            env = celpy.Environment()
            try:
                _check_escapes(rule)
                program = env.program(env.compile(rule))
            except Exception as exc:
                raise SchemaError(
                    f"{where or '<root>'}: x-kubernetes-validations rule {rule!r}: {exc}"
                ) from exc
            self._programs[rule] = program
        return program

    def _check_rules(
        self, node: dict[str, Any], value: Any, old: Any, path: str, errors: list[FieldError]
    ) -> None:
        rules = node.get("x-kubernetes-validations") or ()
        if not rules:
            return
        import celpy
        from celpy.adapter import json_to_cel

        for rule in rules:
            text = rule["rule"]
            if "oldSelf" in text and old is None:
                continue  # a transition rule: only on updates of an existing value
            activation = {"self": json_to_cel(value)}
            if old is not None:
                activation["oldSelf"] = json_to_cel(old)
            try:
                result = self._program(text).evaluate(activation)
            except Exception as exc:  # an evaluation error fails the rule, as in the server
                result = exc
            if isinstance(result, celpy.celtypes.BoolType) and bool(result):
                continue
            if isinstance(result, Exception):
                why = f"{text}: {result}"
            else:
                why = str(rule.get("message") or f"failed rule: {text}")
            errors.append(
                FieldError(
                    path + str(rule.get("fieldPath") or "") or "<root>",
                    str(rule.get("reason") or "FieldValueInvalid"),
                    f"Invalid value: {_quote(value)}: {why}",
                )
            )

    # ----------------------------------------------------------------- admission
    def admit(self, obj: dict[str, Any], old: dict[str, Any] | None = None) -> Admission:
        """Prune, default and validate ``obj`` (``old``: the stored object, on updates)."""
        body = copy.deepcopy(obj)
        result = Admission(body)
        props = self.schema.get("properties") or {}
        for key in list(body):
            if key in _TOP_LEVEL:
                continue
            if key not in props and not self.schema.get("x-kubernetes-preserve-unknown-fields"):
                result.unknown.append(key)
                del body[key]
                continue
            if key in props:
                body[key] = self._prune(props[key], body[key], key, result.unknown)
                if body[key] is _DROP:
                    del body[key]
        self._default(self.schema, body, top=True)
        errors = result.errors
        for name in self.schema.get("required") or ():
            if name not in body:
                errors.append(FieldError(name, "FieldValueRequired", "Required value"))
        for key, sub in props.items():
            if key in body and key not in _TOP_LEVEL:
                self._validate(sub, body[key], (old or {}).get(key), key, errors)
        if not errors:
            self._check_rules(self.schema, body, old, "", errors)
        return result

    def _prune(self, node: dict[str, Any], value: Any, path: str, unknown: list[str]) -> Any:
        if value is None:
            return None if node.get("nullable") else _DROP
        if isinstance(value, dict) and not node.get("x-kubernetes-preserve-unknown-fields"):
            props = node.get("properties")
            extra = node.get("additionalProperties")
            if props is not None or isinstance(extra, dict) or node.get("type") == "object":
                for key in list(value):
                    if props is not None and key in props:
                        sub = props[key]
                    elif isinstance(extra, dict):
                        sub = extra
                    elif extra is True:
                        continue
                    else:
                        unknown.append(f"{path}.{key}")
                        del value[key]
                        continue
                    value[key] = self._prune(sub, value[key], f"{path}.{key}", unknown)
                    if value[key] is _DROP:
                        del value[key]
        elif isinstance(value, list) and isinstance(node.get("items"), dict):
            items = [self._prune(node["items"], v, f"{path}[{i}]", unknown) for i, v in enumerate(value)]
            value[:] = [v for v in items if v is not _DROP]
        return value

    def _default(self, node: dict[str, Any], value: Any, top: bool = False) -> None:
        if isinstance(value, dict):
            for key, sub in (node.get("properties") or {}).items():
                if top and key in _TOP_LEVEL:
                    continue
                if key not in value and "default" in sub:
                    value[key] = copy.deepcopy(sub["default"])
                if key in value:
                    self._default(sub, value[key])
            extra = node.get("additionalProperties")
            if isinstance(extra, dict):
                for key in value:
                    if not (node.get("properties") or {}).get(key):
                        self._default(extra, value[key])
        elif isinstance(value, list) and isinstance(node.get("items"), dict):
            for item in value:
                self._default(node["items"], item)

    def _validate(
        self, node: dict[str, Any], value: Any, old: Any, path: str, errors: list[FieldError]
    ) -> None:
        before = len(errors)
        kind = node.get("type")
        if node.get("x-kubernetes-int-or-string"):
            if _type_of(value) not in ("integer", "string"):
                errors.append(
                    FieldError(
                        path,
                        "FieldValueTypeInvalid",
                        f"Invalid value: {_quote(value)}: {path} in body must be of type integer or string: "
                        f"{_quote(_type_of(value))}",
                    )
                )
                return
        elif kind and not _fits(value, kind):
            errors.append(
                FieldError(
                    path,
                    "FieldValueTypeInvalid",
                    f"Invalid value: {_quote(_type_of(value))}: {path} in body must be of type {kind}: "
                    f"{_quote(_type_of(value))}",
                )
            )
            return
        if "enum" in node and value not in node["enum"]:
            supported = ", ".join(_quote(v) for v in node["enum"])
            errors.append(
                FieldError(
                    path,
                    "FieldValueNotSupported",
                    f"Unsupported value: {_quote(value)}: supported values: {supported}",
                )
            )
        if isinstance(value, str):
            self._validate_string(node, value, path, errors)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            if "minimum" in node and value < node["minimum"]:
                errors.append(_invalid(path, value, f"should be greater than or equal to {node['minimum']}"))
            if "maximum" in node and value > node["maximum"]:
                errors.append(_invalid(path, value, f"should be less than or equal to {node['maximum']}"))
        elif isinstance(value, list):
            self._validate_list(node, value, old, path, errors)
        elif isinstance(value, dict):
            self._validate_object(node, value, old, path, errors)
        if len(errors) == before:
            self._check_rules(node, value, old, path, errors)

    @staticmethod
    def _validate_string(node: dict[str, Any], value: str, path: str, errors: list[FieldError]) -> None:
        if "maxLength" in node and len(value) > node["maxLength"]:
            errors.append(
                FieldError(
                    path, "FieldValueTooLong", f"Too long: may not be more than {node['maxLength']} bytes"
                )
            )
        if "minLength" in node and len(value) < node["minLength"]:
            errors.append(_invalid(path, _quote(value), f"should be at least {node['minLength']} chars long"))
        if "pattern" in node and re.search(node["pattern"], value) is None:
            errors.append(_invalid(path, _quote(value), f"should match '{node['pattern']}'"))
        if node.get("format") == "date-time" and not _DATE_TIME.match(value):
            errors.append(_invalid(path, _quote(value), f"must be of type date-time: {_quote(value)}"))

    def _validate_list(
        self, node: dict[str, Any], value: list[Any], old: Any, path: str, errors: list[FieldError]
    ) -> None:
        if "maxItems" in node and len(value) > node["maxItems"]:
            errors.append(
                FieldError(
                    path,
                    "FieldValueTooMany",
                    f"Too many: {len(value)}: must have at most {node['maxItems']} items",
                )
            )
        if "minItems" in node and len(value) < node["minItems"]:
            errors.append(_invalid(path, len(value), f"should have at least {node['minItems']} items"))
        list_type = node.get("x-kubernetes-list-type")
        keys = node.get("x-kubernetes-list-map-keys") or []
        seen: set[str] = set()
        for i, item in enumerate(value):
            if list_type == "map" and isinstance(item, dict):
                ident = json.dumps([item.get(k) for k in keys])
                shown = ", ".join(f"{k}={json.dumps(item.get(k))}" for k in keys)
            elif list_type == "set":
                ident = shown = json.dumps(item, sort_keys=True)
            else:
                ident = shown = ""
            if ident:
                if ident in seen:
                    errors.append(
                        FieldError(f"{path}[{i}]", "FieldValueDuplicate", f"Duplicate value: {{{shown}}}")
                    )
                seen.add(ident)
        items = node.get("items")
        if isinstance(items, dict):
            olds = _old_items(node, old)
            for i, item in enumerate(value):
                self._validate(items, item, _match_old(node, item, olds, i), f"{path}[{i}]", errors)

    def _validate_object(
        self, node: dict[str, Any], value: dict[str, Any], old: Any, path: str, errors: list[FieldError]
    ) -> None:
        old_map = old if isinstance(old, dict) else {}
        for name in node.get("required") or ():
            if name not in value:
                errors.append(FieldError(f"{path}.{name}", "FieldValueRequired", "Required value"))
        if "maxProperties" in node and len(value) > node["maxProperties"]:
            errors.append(
                FieldError(
                    path,
                    "FieldValueTooMany",
                    f"Too many: {len(value)}: must have at most {node['maxProperties']} items",
                )
            )
        props = node.get("properties") or {}
        extra = node.get("additionalProperties")
        for key, item in value.items():
            sub = props.get(key) if key in props else extra if isinstance(extra, dict) else None
            if sub is not None:
                where = f"{path}.{key}" if key in props else f"{path}[{key}]"
                self._validate(sub, item, old_map.get(key), where, errors)


_CEL_ESCAPES = set("abfnrtv\\'\"`?01234567xuU")


def _check_escapes(rule: str) -> None:
    """cel-go (the API server's CEL) refuses an unknown escape such as ``\\s`` in a
    string literal; cel-python lets it pass, so the emulator checks for it."""
    quote = ""
    raw = False
    i = 0
    while i < len(rule):
        ch = rule[i]
        if not quote:
            if ch in "'\"":
                quote, raw = ch, i > 0 and rule[i - 1] in "rR"
        elif ch == "\\" and not raw:
            nxt = rule[i + 1 : i + 2]
            if nxt not in _CEL_ESCAPES:
                raise ValueError(f"invalid escape sequence '\\{nxt}' in a string literal")
            i += 1
        elif ch == quote:
            quote = ""
        i += 1


class _Drop:
    """Marks a value pruning removes (a null the schema does not allow)."""


_DROP: Any = _Drop()


def _old_items(node: dict[str, Any], old: Any) -> dict[str, Any]:
    if not isinstance(old, list) or node.get("x-kubernetes-list-type") != "map":
        return {}
    keys = node.get("x-kubernetes-list-map-keys") or []
    return {json.dumps([o.get(k) for k in keys]): o for o in old if isinstance(o, dict)}


def _match_old(node: dict[str, Any], item: Any, olds: dict[str, Any], _index: int) -> Any:
    """An item's old self: by key in a list-map (other lists have no correlation)."""
    if not olds or not isinstance(item, dict):
        return None
    keys = node.get("x-kubernetes-list-map-keys") or []
    return olds.get(json.dumps([item.get(k) for k in keys]))


def error_message(kind: str, group: str, name: str, errors: list[FieldError]) -> str:
    """The Status message the API server writes for field errors."""
    joined = str(errors[0]) if len(errors) == 1 else "[" + ", ".join(str(e) for e in errors) + "]"
    return f'{kind}.{group} "{name}" is invalid: {joined}'
