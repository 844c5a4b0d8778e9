"""The relay's rule for applying edge status to a Device: pure, idempotent and
order-insensitive, so the relay keeps no state and several replicas can run.

An edge ``status`` message is one composed outbox entry: a merge patch of Device status
(``twins`` keyed by property name, ``conditions`` keyed by type) and the entry's outbox
revision ``rev`` (engine-wide, strictly increasing, never reused). A field is taken only
if it is newer than what status holds:

* ``twins[].reported``: by its own ``metadata.version`` (per property, strictly
  increasing at the edge);
* everything else (``state`` with ``lastOnlineTime``, each ``observedDesired``, each
  ``readError``, each condition): by ``rev``, remembered per field in
  ``status.revisions`` (e.g. ``{"state": 12, "observedDesired/setpoint": 14}``).

So replays and duplicates change nothing, and messages applied in any order end in the
state the newest of each field says. ``summary`` (the kubectl Twin column) is derived from
the reported values.
"""

from __future__ import annotations

import copy
from typing import Any

SUMMARY_MAX = 60


def _int(text: Any) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        return 0


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def merge_edge_status(status: dict[str, Any] | None, patch: dict[str, Any], rev: int) -> dict[str, Any]:
    """The status after applying one edge message (a new dict; inputs are not changed).

    Total: a gateway is a peer, and whatever its message holds, parts that do not fit the
    status shape are ignored rather than raised on (a write that raised would be retried
    for ever)."""
    new: dict[str, Any] = copy.deepcopy(status) if isinstance(status, dict) else {}
    revisions = {k: v for k, v in _dict(new.get("revisions")).items() if isinstance(v, int)}
    new["revisions"] = revisions
    patch = _dict(patch)

    def newer(key: str) -> bool:
        if rev > revisions.get(key, 0):
            revisions[key] = rev
            return True
        return False

    for key in ("observedGeneration", "edgeStore"):
        # The spec generation the gateway serves, and its store's id (spec_feed.py uses
        # both to keep the relay's own status writes from echoing back to the edge).
        if key in patch and newer(key):
            new[key] = patch[key]
    if ("state" in patch or "lastOnlineTime" in patch) and newer("state"):
        for key in ("state", "lastOnlineTime"):
            if key in patch:
                if patch[key] is None:
                    new.pop(key, None)
                else:
                    new[key] = patch[key]
    conditions = patch.get("conditions")
    if isinstance(conditions, dict):
        current = {c.get("type"): c for c in _list(new.get("conditions")) if isinstance(c, dict)}
        for ctype, cond in conditions.items():
            if (cond is None or isinstance(cond, dict)) and newer(f"conditions/{ctype}"):
                if cond is None:
                    current.pop(ctype, None)
                else:
                    current[ctype] = {**cond, "type": ctype}
        new["conditions"] = [current[k] for k in sorted(current, key=str)]
    twins = patch.get("twins")
    if isinstance(twins, dict):
        entries = {
            t.get("propertyName"): t
            for t in _list(new.get("twins"))
            if isinstance(t, dict) and "propertyName" in t
        }
        for name, change in twins.items():
            if change is None:  # the property is no longer in the device's model
                if newer(f"twin/{name}"):
                    entries.pop(name, None)
                continue
            if not isinstance(change, dict):
                continue
            entry = entries.setdefault(name, {"propertyName": name})
            reported = change.get("reported")
            if isinstance(reported, dict):
                have = _int(_dict(_dict(entry.get("reported")).get("metadata")).get("version"))
                if _int(_dict(reported.get("metadata")).get("version")) > have:
                    entry["reported"] = copy.deepcopy(reported)
            for key in ("observedDesired", "readError"):
                if key in change and newer(f"{key}/{name}"):
                    if change[key] is None or change[key] == "":
                        entry.pop(key, None)
                    else:
                        entry[key] = copy.deepcopy(change[key])
        new["twins"] = [entries[k] for k in sorted(entries, key=str)]
        new["summary"] = summary(new["twins"])
    return new


def summary(twins: list[dict[str, Any]]) -> str:
    """``name=value`` of the reported values, shortened for a table column."""
    parts = [
        f"{t['propertyName']}={t['reported'].get('value', '')}"
        for t in twins
        if isinstance(t, dict) and isinstance(t.get("reported"), dict)
    ]
    text = " ".join(parts)
    return text if len(text) <= SUMMARY_MAX else text[: SUMMARY_MAX - 3] + "..."
