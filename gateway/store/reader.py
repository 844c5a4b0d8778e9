"""Reading a gateway store from another process (the CLI, tests): read-only, safe while
the gateway writes to it (WAL); rows as the plain dicts ``edgetwin twin`` prints. The
gateway never imports this module (sqlite-utils and what it loads cost ~3 MB of RSS)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import sqlite_utils

from edgetwin.gateway.store.schema import StoreError


def open_reader(path: str | Path) -> sqlite_utils.Database:
    """A read-only view of a store, safe while the gateway writes to it (WAL)."""
    p = Path(path)
    if not p.exists():
        raise StoreError(f"no store at {p} (has the gateway run with this config?)")
    conn = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
    conn.execute("PRAGMA busy_timeout=5000")
    return sqlite_utils.Database(conn)


def read_events(
    db: sqlite_utils.Database, device_id: str | None = None, kind: str | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    """The newest ``limit`` events, oldest first, optionally of one device and kind."""
    where, params = [], []
    if device_id is not None:
        where.append("device_id = ?")
        params.append(device_id)
    if kind is not None:
        where.append("kind = ?")
        params.append(kind)
    sql = "SELECT * FROM events" + (" WHERE " + " AND ".join(where) if where else "")
    rows = list(db.query(sql + " ORDER BY id DESC LIMIT ?", [*params, max(0, limit)]))
    return [
        {
            "id": r["id"],
            "ts_ms": r["ts_ms"],
            "device": r["device_id"],
            "property": r["property"],
            "kind": r["kind"],
            "detail": json.loads(r["detail"]),
        }
        for r in reversed(rows)
    ]


def read_twin(db: sqlite_utils.Database, device_id: str) -> dict[str, Any] | None:
    """The stored twin of one device as a JSON-ready dict, or None if unknown."""
    props = list(db.query("SELECT * FROM twin_property WHERE device_id = ? ORDER BY property", [device_id]))
    if not props:
        return None
    state = next(iter(db.query("SELECT * FROM device_state WHERE device_id = ?", [device_id])), None)
    twin: dict[str, Any] = {}
    for row in props:
        entry: dict[str, Any] = {}
        if row["reported_value"] is not None:
            entry["reported"] = {
                "value": json.loads(row["reported_value"]),
                "timestamp": row["reported_ts"],
                "version": row["reported_version"],
            }
        if row["desired_value"] is not None:
            entry["desired"] = {
                "value": json.loads(row["desired_value"]),
                "origin": row["desired_origin"],
                "stamp": row["desired_stamp"],
                "writeState": row["write_state"],
                "writeReason": row["write_reason"],
            }
        if row["read_error"]:
            entry["readError"] = row["read_error"]
        twin[row["property"]] = entry
    return {
        "device": device_id,
        "state": state["state"] if state else "unknown",
        "lastOnlineMs": state["last_online_ms"] if state else None,
        "twin": twin,
    }


def list_devices(db: sqlite_utils.Database) -> list[dict[str, Any]]:
    """Every device of a store: where its definition comes from, readiness, state, how
    many properties, and whether status is waiting to go to the cloud (an outbox row,
    or properties whose latest values the cloud has not acknowledged)."""
    served = {r["device_id"]: r["source"] for r in db.query("SELECT device_id, source FROM served")}
    states = {r["device_id"]: r for r in db.query("SELECT * FROM device_state")}
    counts = {
        r["device_id"]: (r["n"], r["pending"])
        for r in db.query(
            "SELECT device_id, count(*) AS n, count(outbox_rev) AS pending "
            "FROM twin_property GROUP BY device_id"
        )
    }
    outbox = {r["device_id"] for r in db.query("SELECT device_id FROM outbox")}
    out = []
    for dev_id in sorted(set(states) | set(counts) | set(served)):
        row = states.get(dev_id)
        conditions = json.loads(row["conditions"]) if row else {}
        ready = conditions.get("Ready") or {}
        n, pending = counts.get(dev_id, (0, 0))
        out.append(
            {
                "device": dev_id,
                "source": served.get(dev_id, "cluster" if dev_id not in counts else "manifest"),
                "ready": {"True": True, "False": False}.get(ready.get("status", "")),
                "reason": ready.get("message", ""),
                "state": row["state"] if row else "unknown",
                "properties": n,
                "outbox": dev_id in outbox or pending > 0,
            }
        )
    return out


def gateway_summary(db: sqlite_utils.Database, now_ms: int) -> dict[str, Any]:
    """What ``edgetwin status`` shows from the store: devices (served, online, not
    ready), the outbox (devices waiting and the age of the oldest entry) and the event
    log's last hour by kind."""
    devices = list_devices(db)
    not_ready = [d for d in devices if d["ready"] is False]
    oldest = next(iter(db.query("SELECT min(since_ms) AS t, count(*) AS n FROM outbox")), {"t": None, "n": 0})
    pending = {d["device"] for d in devices if d["outbox"]}
    events = {
        r["kind"]: r["n"]
        for r in db.query(
            "SELECT kind, count(*) AS n FROM events WHERE ts_ms >= ? AND kind != 'state' GROUP BY kind",
            [now_ms - 3_600_000],
        )
    }
    return {
        "devices": {
            "served": next(iter(db.query("SELECT count(*) AS n FROM served")))["n"],
            "online": sum(1 for d in devices if d["state"] == "online"),
            "offline": sum(1 for d in devices if d["state"] == "offline"),
            "not_ready": len(not_ready),
            "not_ready_examples": [(d["device"], d["reason"]) for d in not_ready[:3]],
        },
        "outbox": {
            "devices": max(len(pending), int(oldest["n"] or 0)),
            "oldest_age_s": (now_ms - oldest["t"]) / 1000 if oldest["t"] is not None else None,
        },
        "events_last_hour": events,
    }


def device_ids(db: sqlite_utils.Database) -> list[str]:
    """Every device id the store knows (served, with a twin or a state, or named in the
    event log: a device no longer served still has its events)."""
    rows = db.query(
        "SELECT device_id FROM served UNION SELECT device_id FROM twin_property "
        "UNION SELECT device_id FROM device_state UNION SELECT device_id FROM events "
        "ORDER BY device_id"
    )
    return [r["device_id"] for r in rows]


def read_model_properties(db: sqlite_utils.Database, device_id: str) -> dict[str, dict[str, Any]] | None:
    """The DeviceModel properties a device was last served with (name -> the model's
    property: type, accessMode, minimum, maximum), or None if it is not served."""
    row = next(iter(db.query("SELECT model FROM served WHERE device_id = ?", [device_id])), None)
    if row is None:
        return None
    model = json.loads(row["model"])
    return {p["name"]: p for p in (model.get("spec") or {}).get("properties") or [] if "name" in p}
