"""The SQLite store: schema migrations, durability settings, bounds, round trips."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from edgetwin.deviceapi import DeviceModel
from edgetwin.gateway.store.batch import snapshot
from edgetwin.gateway.store.reader import open_reader, read_twin
from edgetwin.gateway.store.schema import SCHEMA_VERSION, SchemaTooNew, StoreError
from edgetwin.gateway.store.writer import Store
from edgetwin.gateway.twin.engine import TwinEngine
from edgetwin.gateway.twin.model import Event
from tests.conftest import THERMO_PROPS, model_doc
from tests.gateway.twin.test_engine import MODEL, device


def test_fresh_store_is_wal_full_sync_and_current(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    store.close()


def test_refuses_a_store_from_a_newer_edgetwin(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    Store(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(SchemaTooNew, match="newer than this edgetwin"):
        Store(path)


def test_unwritable_store_names_the_path(tmp_path: Path) -> None:
    bad = tmp_path / "file"
    bad.write_text("x")
    with pytest.raises(StoreError, match=str(bad / "s.db")):
        Store(bad / "s.db")


def test_round_trip_restores_twins_outbox_and_clock(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = Store(path)
    e = TwinEngine()
    e.upsert_device(device("t1"), MODEL)
    e.apply_reported("plant.t1", {"temperature": 20.5, "label": "x"}, 1000)
    e.apply_reported("plant.t1", {"temperature": 21}, 2000)
    e.apply_desired("plant.t1", "setpoint", 22, "edge", 3000)
    e.set_state("plant.t1", "online", 3000)
    store.commit(snapshot(e, e.drain()))
    store.close()

    store = Store(path)
    fresh = TwinEngine()
    fresh.upsert_device(device("t1"), MODEL)
    store.load_into(fresh)
    p = fresh.devices["plant.t1"].properties
    assert p["temperature"].reported is not None and p["temperature"].reported.value == 21.0
    assert p["temperature"].last_version == 2
    assert p["setpoint"].desired is not None and p["setpoint"].desired.value == 22.0
    assert fresh.devices["plant.t1"].state == "online"
    assert fresh.outbox["plant.t1"].patch == e.outbox["plant.t1"].patch
    assert fresh.clock.last >= e.clock.last
    # The next version continues after the stored one.
    assert fresh.apply_reported("plant.t1", {"temperature": 1}, 4000).accepted["temperature"].version == 3
    twin = read_twin(open_reader(path), "plant.t1")
    assert twin is not None and twin["twin"]["label"]["reported"]["value"] == "x"
    store.close()


def test_prune_drops_rows_of_properties_gone_from_the_model(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    e = TwinEngine()
    e.upsert_device(device("t1"), MODEL)
    e.apply_reported("plant.t1", {"label": "x", "count": 1}, 0)
    store.commit(snapshot(e, e.drain()))
    smaller = DeviceModel.model_validate(
        model_doc("thermostat", "plant", [p for p in THERMO_PROPS if p["name"] != "label"])
    )
    fresh = TwinEngine()
    fresh.upsert_device(device("t1"), smaller)
    store.load_into(fresh)
    store.prune(fresh)
    twin = read_twin(open_reader(tmp_path / "s.db"), "plant.t1")
    assert (
        twin is not None and "label" not in twin["twin"] and twin["twin"]["count"]["reported"]["value"] == 1
    )
    store.close()


def test_event_log_keeps_the_newest_rows(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db", events_max=100)
    e = TwinEngine()
    for batch in range(5):
        changes = e.drain()
        changes.events = [Event(i, "plant.t1", "p", "rejected", {"i": batch * 60 + i}) for i in range(60)]
        store.commit(snapshot(e, changes))
    rows = store.conn.execute("SELECT count(*), min(id), max(id) FROM events").fetchone()
    assert rows == (100, 201, 300)
    assert store.events_dropped == 200
    store.close()


def test_reader_reports_missing_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no store at"):
        open_reader(tmp_path / "absent.db")


async def test_auto_commit_mode_moves_slow_fsyncs_off_the_loop(tmp_path: Path) -> None:
    import threading

    from edgetwin.gateway.store.writer import StoreWriter

    # The commit's duration comes from a clock the test drives, so the real disk's speed
    # (CI's can take 10 ms and more per fsync) does not decide the mode.
    now = {"s": 0.0}
    store = Store(tmp_path / "s.db")
    writer = StoreWriter(store, "auto", clock=lambda: now["s"])
    threads: list[str] = []
    real_finish = store.finish
    delay = {"s": 0.0002}

    def finish() -> None:
        threads.append(threading.current_thread().name)
        now["s"] += delay["s"]
        real_finish()

    store.finish = finish  # type: ignore[method-assign]
    e = TwinEngine()
    e.upsert_device(device("t1"), MODEL)
    for _ in range(3):
        e.apply_reported("plant.t1", {"count": 1}, 0)
        await writer.commit(snapshot(e, e.drain()))
    assert threads == ["MainThread"] * 3  # fast fsyncs: inline
    delay["s"] = 0.02  # a slow SD card
    for _ in range(6):
        e.apply_reported("plant.t1", {"count": 2}, 0)
        await writer.commit(snapshot(e, e.drain()))
    assert threads[-1].startswith("store-writer") and not writer.inline
    writer.close()
    store.close()


def test_read_events_filters_and_orders(tmp_path: Path) -> None:
    from edgetwin.gateway.store.reader import read_events

    store = Store(tmp_path / "s.db")
    e = TwinEngine()
    changes = e.drain()
    changes.events = [
        Event(1, "plant.a", "p", "rejected", {"reason": "r1"}),
        Event(2, "plant.b", "p", "conflict", {"message": "m"}),
        Event(3, "plant.a", "q", "rejected", {"reason": "r2"}),
        Event(4, "plant.a", "", "state", {"from": "unknown", "to": "online"}),
    ]
    store.commit(snapshot(e, changes))
    db = open_reader(tmp_path / "s.db")
    assert [ev["ts_ms"] for ev in read_events(db)] == [1, 2, 3, 4]
    assert [ev["detail"]["reason"] for ev in read_events(db, "plant.a", "rejected")] == ["r1", "r2"]
    assert [ev["ts_ms"] for ev in read_events(db, limit=2)] == [3, 4]  # the newest, oldest first
    store.close()


def test_noisy_events_are_trimmed_before_conflicts_and_failed_writes(tmp_path: Path) -> None:
    """A device failing every poll must not push conflicts out of the event log."""
    store = Store(tmp_path / "s.db", events_max=100)
    e = TwinEngine()
    changes = e.drain()
    changes.events = [Event(i, "plant.t1", "setpoint", "conflict", {"i": i}) for i in range(40)]
    changes.events += [Event(i, "plant.t1", "setpoint", "write_failed", {"i": i}) for i in range(10)]
    store.commit(snapshot(e, changes))
    for _ in range(20):
        changes = e.drain()
        changes.events = [Event(i, "plant.t2", "count", "read_error", {"i": i}) for i in range(60)]
        store.commit(snapshot(e, changes))
    kinds = dict(store.conn.execute("SELECT kind, count(*) FROM events GROUP BY kind").fetchall())
    assert kinds == {"conflict": 40, "write_failed": 10, "read_error": 50}
    assert store.events_dropped == 20 * 60 - 50
    # Important events alone beyond the bound: the oldest of them go.
    changes = e.drain()
    changes.events = [Event(i, "plant.t1", "setpoint", "conflict", {"i": i}) for i in range(120)]
    store.commit(snapshot(e, changes))
    assert store.conn.execute("SELECT count(*), sum(important) FROM events").fetchone() == (100, 100)
    store.close()
    # The count survives a reopen (the bound is kept across restarts).
    again = Store(tmp_path / "s.db", events_max=100)
    changes = e.drain()
    changes.events = [Event(0, "plant.t1", "", "rejected", {})]
    again.commit(snapshot(e, changes))
    assert again.conn.execute("SELECT count(*) FROM events").fetchone() == (100,)
    again.close()


def test_a_property_removed_live_leaves_the_store_and_the_cloud_even_across_a_restart(tmp_path: Path) -> None:
    """A DeviceModel change that drops a property: its row goes in the same commit, and
    the outbox asks the cloud to drop its twin entry; that request survives a restart."""
    path = tmp_path / "s.db"
    store = Store(path)
    e = TwinEngine()
    e.upsert_device(device("t1"), MODEL)
    e.apply_reported("plant.t1", {"label": "x", "count": 1}, 0)
    store.commit(snapshot(e, e.drain()))
    e.outbox_acked("plant.t1", e.outbox["plant.t1"].revision)
    store.commit(snapshot(e, e.drain()))
    smaller = DeviceModel.model_validate(
        model_doc("thermostat", "plant", [p for p in THERMO_PROPS if p["name"] != "label"])
    )
    e.upsert_device(device("t1"), smaller)
    assert e.outbox["plant.t1"].patch == {"twins": {"label": None}}
    store.commit(snapshot(e, e.drain()))
    twin = read_twin(open_reader(path), "plant.t1")
    assert twin is not None and "label" not in twin["twin"] and "count" in twin["twin"]
    store.close()
    store = Store(path)
    fresh = TwinEngine()
    fresh.upsert_device(device("t1"), smaller)
    store.load_into(fresh)
    assert fresh.outbox["plant.t1"].patch == {"twins": {"label": None}}
    store.close()


def test_the_age_of_the_oldest_pending_status_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = Store(path)
    clock = [1_800_000_000_000]
    e = TwinEngine(wall_ms=lambda: clock[0])
    for name in ("t1", "t2"):
        e.upsert_device(device(name), MODEL)
    e.drain()
    assert e.backlog() == (0, None)
    e.apply_reported("plant.t1", {"count": 1}, 0)
    clock[0] += 5_000
    e.apply_reported("plant.t2", {"count": 1}, 0)
    e.apply_reported("plant.t1", {"count": 2}, 0)  # composes into t1's entry: still the oldest
    assert e.backlog() == (2, 1_800_000_000_000)
    store.commit(snapshot(e, e.drain()))
    store.close()
    store = Store(path)
    fresh = TwinEngine(wall_ms=lambda: clock[0] + 60_000)
    for name in ("t1", "t2"):
        fresh.upsert_device(device(name), MODEL)
    store.load_into(fresh)
    assert fresh.backlog() == (2, 1_800_000_000_000)
    fresh.outbox_acked("plant.t1", fresh.outbox["plant.t1"].revision)
    assert fresh.backlog() == (1, 1_800_000_005_000)
    store.close()
