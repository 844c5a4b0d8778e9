"""The relay's rule for applying edge status to a Device: pure, idempotent and
order-insensitive, so the relay keeps no state and several replicas can run.

An edge ``status`` message is one composed outbox entry: a merge patch of Device status
(``twins`` keyed by property name, ``conditions`` keyed by type) and the entry's outbox
revision ``rev`` (engine-wide, strictly increasing, never reused). A field is taken only
if it is newer than what status holds:

* ``twins[].reported``: by its own ``metadata.version`` (per property, strictly
  increasing at the edge); the rev that brought it is kept as ``reported/NAME``;
* ``twins[NAME] = None`` (the property left the model): a tombstone at ``rev``
  (``twin/NAME``) that drops the twin's fields taken from older messages and keeps
  older messages from bringing them back;
* everything else (``state`` with ``lastOnlineTime``, each ``observedDesired``, each
  ``readError``, each condition): by ``rev``, remembered per field in
  ``status.revisions`` (e.g. ``{"state": 12, "observedDesired/setpoint": 14}``).

So replays and duplicates change nothing, and messages applied in any order end in the
state the newest of each field says. ``summary`` (the kubectl Twin column) and
``lastReportTime`` (the Reported column) are derived from the reported values.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

SUMMARY_MAX = 60
_TWIN_FIELDS = ("reported", "observedDesired", "readError")


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
            if not (change is None or isinstance(change, dict)):
                continue
            # A removal (the property left the device's model) is a tombstone at its rev:
            # it drops every field of the twin taken from an older message, and older
            # messages arriving later are ignored; newer ones bring the twin back.
            tomb = revisions.get(f"twin/{name}", 0)
            if change is None:
                if rev > tomb:
                    revisions[f"twin/{name}"] = tomb = rev
                    entry = entries.get(name, {})
                    for key in _TWIN_FIELDS:
                        if revisions.get(f"{key}/{name}", 0) < tomb:
                            entry.pop(key, None)
                            revisions.pop(f"{key}/{name}", None)
                continue
            if rev < tomb:
                continue
            entry = entries.setdefault(name, {"propertyName": name})
            reported = change.get("reported")
            if isinstance(reported, dict):
                have = _int(_dict(_dict(entry.get("reported")).get("metadata")).get("version"))
                if _int(_dict(reported.get("metadata")).get("version")) > have:
                    entry["reported"] = copy.deepcopy(reported)
                    revisions[f"reported/{name}"] = rev
            for key in ("observedDesired", "readError"):
                if key in change and newer(f"{key}/{name}"):
                    if change[key] is None or change[key] == "":
                        entry.pop(key, None)
                    else:
                        entry[key] = copy.deepcopy(change[key])
        entries = {k: e for k, e in entries.items() if any(f in e for f in _TWIN_FIELDS)}
        new["twins"] = [entries[k] for k in sorted(entries, key=str)]
        new["summary"] = summary(new["twins"])
        newest = last_report_time(new["twins"])
        if newest is None:
            new.pop("lastReportTime", None)
        else:
            new["lastReportTime"] = newest
    return new


def last_report_time(twins: list[dict[str, Any]]) -> str | None:
    """The time of the newest reported value (the kubectl Reported column: how stale the
    twin is), from the values' own ``metadata.timestamp`` (milliseconds)."""
    newest = max(
        (
            _int(_dict(_dict(t.get("reported")).get("metadata")).get("timestamp"))
            for t in twins
            if isinstance(t, dict)
        ),
        default=0,
    )
    if not 0 < newest < 253402300800000:  # before year 10000: a datetime can hold it
        return None
    when = datetime.fromtimestamp(newest / 1000, UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{newest % 1000:03d}Z"


def summary(twins: list[dict[str, Any]]) -> str:
    """``name=value`` of the reported values, shortened for a table column."""
    parts = [
        f"{t['propertyName']}={t['reported'].get('value', '')}"
        for t in twins
        if isinstance(t, dict) and isinstance(t.get("reported"), dict)
    ]
    text = " ".join(parts)
    return text if len(text) <= SUMMARY_MAX else text[: SUMMARY_MAX - 3] + "..."
