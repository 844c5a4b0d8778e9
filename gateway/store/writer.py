"""The gateway store's writer: twins, outbox, event log and loaded objects in one SQLite file.

Durability: WAL with ``synchronous=FULL``, so a committed transaction survives SIGKILL
and power loss. Throughput comes from group commit: the service hands over everything
that changed while the previous commit was running as one :class:`Batch`, written in one
transaction on one writer thread, and acknowledges the inputs only after it returns.
What a commit holds is composed in ``batch``; other processes read with ``reader``.

Bounds: twin rows and outbox rows are bounded by the devices and properties defined;
the event log keeps the newest ``events_max`` rows and drops the oldest beyond that.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from edgetwin.gateway.store.batch import Batch
from edgetwin.gateway.store.schema import StoreError, migrate
from edgetwin.gateway.twin.engine import TwinEngine
from edgetwin.gateway.twin.hlc import Stamp
from edgetwin.gateway.twin.model import Desired, PropertyTwin, Reported, WriteState

log = logging.getLogger(__name__)

DEFAULT_EVENTS_MAX = 10_000


_UPSERT_PROPERTY = "INSERT OR REPLACE INTO twin_property VALUES (" + ",".join("?" * 19) + ")"


class Store:
    """One connection, used by one thread at a time (the writer thread once running)."""

    def __init__(self, path: str | Path, events_max: int = DEFAULT_EVENTS_MAX) -> None:
        self.path = Path(path)
        self.events_max = events_max
        self.events_dropped = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.conn.execute("PRAGMA journal_mode=WAL")
            # FULL: fsync the WAL at every commit, so an acknowledged value survives
            # power loss, not only a process crash.
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute("PRAGMA busy_timeout=5000")
            # Checkpoints run on their own connection and thread (Checkpointer), so the
            # commit path never stalls copying the WAL into the database.
            self.conn.execute("PRAGMA wal_autocheckpoint=0")
            migrate(self.conn)
            self._event_rows = int(self.conn.execute("SELECT count(*) FROM events").fetchone()[0])
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open store {self.path}: {exc}") from exc

    def _rows(self, sql: str) -> Iterator[dict[str, Any]]:
        cursor = self.conn.execute(sql)
        names = [d[0] for d in cursor.description]
        for row in cursor:
            yield dict(zip(names, row, strict=True))

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One durable transaction; an SQLite failure (a full disk, I/O) is a :class:`StoreError`."""
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
                self.conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self.conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write store {self.path}: {exc}") from exc

    # ----------------------------------------------------------------- writing
    def commit(self, batch: Batch) -> None:
        """Write a batch in one durable transaction. Raises :class:`StoreError`."""
        self.stage(batch)
        self.finish()

    def stage(self, batch: Batch) -> None:
        """Open a transaction and write ``batch`` into it, not yet durable. Cheap: it is
        meant for the event loop's thread, leaving only :meth:`finish` (the fsync) to the
        writer thread, so the two threads do not fight over the GIL row by row."""
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write store {self.path}: {exc}") from exc
        try:
            self._write(batch)
        except BaseException as exc:
            self.conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"cannot write store {self.path}: {exc}") from exc
            raise

    def finish(self) -> None:
        """Commit the staged transaction durably (fsync). Raises :class:`StoreError`."""
        try:
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
            raise StoreError(f"cannot commit store {self.path}: {exc}") from exc

    def _write(self, batch: Batch) -> None:
        c = self.conn
        if batch.removed:
            for table in ("twin_property", "device_state", "outbox", "served"):
                c.executemany(f"DELETE FROM {table} WHERE device_id = ?", batch.removed)
        if batch.properties:
            c.executemany(_UPSERT_PROPERTY, batch.properties)
        if batch.property_deletes:
            c.executemany(
                "DELETE FROM twin_property WHERE device_id = ? AND property = ?", batch.property_deletes
            )
        if batch.devices:
            c.executemany("INSERT OR REPLACE INTO device_state VALUES (?,?,?,?,?)", batch.devices)
        if batch.outbox_upserts:
            c.executemany("INSERT OR REPLACE INTO outbox VALUES (?,?,?,?)", batch.outbox_upserts)
        if batch.outbox_deletes:
            c.executemany("DELETE FROM outbox WHERE device_id = ?", batch.outbox_deletes)
        if batch.events:
            c.executemany(
                "INSERT INTO events (ts_ms, device_id, property, kind, detail, important) "
                "VALUES (?,?,?,?,?,?)",
                batch.events,
            )
            self._event_rows += len(batch.events)
            self._trim_events(c)
        if batch.meta:
            c.executemany("INSERT OR REPLACE INTO meta VALUES (?,?)", batch.meta)
        if batch.recent:
            c.executemany("INSERT OR REPLACE INTO recent_updates VALUES (?,?,?,?,?,?)", batch.recent)
            c.execute("DELETE FROM recent_updates WHERE seq < ?", (batch.recent_floor,))
        if batch.objects:
            c.executemany(
                "INSERT OR REPLACE INTO objects VALUES ('cluster',?,?,?,?,?)",
                batch.objects,
            )
        if batch.objects_deleted:
            c.executemany(
                "DELETE FROM objects WHERE source = 'cluster' AND kind = ? AND namespace = ? AND name = ?",
                batch.objects_deleted,
            )
        if batch.served:
            c.executemany("INSERT OR REPLACE INTO served VALUES (?,?,?,?,?,?)", batch.served)
        if batch.unserved:
            c.executemany("DELETE FROM served WHERE device_id = ?", batch.unserved)

    def _trim_events(self, c: sqlite3.Connection) -> None:
        """Keep the newest ``events_max`` rows: the oldest noisy ones (rejections, read
        errors, state changes) go first; conflicts and failed writes only once they
        alone fill the log."""
        over = self._event_rows - self.events_max
        for important in (0, 1):
            if over <= 0:
                break
            cur = c.execute(
                "DELETE FROM events WHERE id IN "
                "(SELECT id FROM events WHERE important = ? ORDER BY id LIMIT ?)",
                (important, over),
            )
            gone = max(cur.rowcount, 0)
            over -= gone
            self._event_rows -= gone
            self.events_dropped += gone

    def save_objects(self, rows: list[tuple[str, str, str, str | None, str]], source: str) -> None:
        """Replace the stored objects of ``source`` (e.g. "manifest") with ``rows`` of
        (kind, namespace, name, resource_version, body)."""
        with self._transaction() as c:
            c.execute("DELETE FROM objects WHERE source = ?", (source,))
            c.executemany(
                "INSERT OR REPLACE INTO objects VALUES (?,?,?,?,?,?)", [(source, *row) for row in rows]
            )

    def load_objects(self, source: str) -> list[tuple[str, dict[str, Any]]]:
        """The stored objects of ``source`` as (kind, object)."""
        rows = self.conn.execute("SELECT kind, body FROM objects WHERE source = ?", (source,)).fetchall()
        return [(kind, json.loads(body)) for kind, body in rows]

    def load_served(self) -> list[tuple[str, str, int, str, dict[str, Any], dict[str, Any]]]:
        """What each device was served with: (device, source, generation, rv, device, model)."""
        rows = self.conn.execute("SELECT * FROM served").fetchall()
        return [(d, src, gen, rv, json.loads(dev), json.loads(model)) for d, src, gen, rv, dev, model in rows]

    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._transaction() as c:
            c.execute("INSERT OR REPLACE INTO meta VALUES (?,?)", (key, value))

    # ----------------------------------------------------------------- loading
    def load_into(self, engine: TwinEngine) -> None:
        """Restore twin state, device state, outbox and clock into an engine whose
        devices are already defined. Rows of devices no longer defined are ignored (the
        caller removes them)."""
        hlc = self.get_meta("hlc")
        if hlc:
            engine.clock.observe(Stamp.parse(hlc))
        for row in self._rows("SELECT * FROM twin_property"):
            dev = engine.devices.get(row["device_id"])
            prop = dev.properties.get(row["property"]) if dev else None
            if prop is not None:
                _restore_property(prop, row)
        for row in self._rows("SELECT * FROM device_state"):
            dev = engine.devices.get(row["device_id"])
            if dev is not None:
                dev.state, dev.last_online_ms = row["state"], row["last_online_ms"]
                dev.conditions = json.loads(row["conditions"])
                dev.observed_generation = row["observed_generation"]
        stored = {r["device_id"]: r for r in self._rows("SELECT * FROM outbox")}
        for dev_id in engine.devices:
            outbox_row = stored.get(dev_id)
            if outbox_row is None:
                engine.restore_outbox(dev_id, 0, {})
            else:
                device_patch = json.loads(outbox_row["device_patch"])
                engine.restore_outbox(dev_id, outbox_row["revision"], device_patch, outbox_row["since_ms"])
        engine.order_outbox()

    def prune(self, engine: TwinEngine) -> None:
        """Delete twin rows of properties no longer in their device's model."""
        orphans = [
            (dev_id, name)
            for dev_id, name in self.conn.execute("SELECT device_id, property FROM twin_property")
            if dev_id in engine.devices and name not in engine.devices[dev_id].properties
        ]
        if orphans:
            with self._transaction() as c:
                c.executemany("DELETE FROM twin_property WHERE device_id = ? AND property = ?", orphans)

    def load_recent(self, limit: int) -> list[tuple[int, str, str, int, int, bytes]]:
        """The newest ``limit`` remembered twin/updates, oldest first."""
        rows = self.conn.execute(
            "SELECT seq, device_id, event_id, digest, ts_ms, answer FROM recent_updates "
            "ORDER BY seq DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [tuple(r) for r in reversed(rows)]

    def stored_device_ids(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT DISTINCT device_id FROM twin_property")}


def _restore_property(prop: PropertyTwin, row: dict[str, Any]) -> None:
    prop.last_version = row["last_version"]
    if row["reported_value"] is not None:
        prop.reported = Reported(
            json.loads(row["reported_value"]), row["reported_ts"], row["reported_version"]
        )
    if row["desired_value"] is not None:
        prop.desired = Desired(
            json.loads(row["desired_value"]),
            row["desired_origin"],
            Stamp.parse(row["desired_stamp"]),
            bool(row["desired_acked"]),
            row["desired_outbox_revision"],
        )
    prop.spec_desired = row["spec_desired"]
    prop.write_state = WriteState(row["write_state"])
    prop.write_reason = row["write_reason"]
    prop.write_attempts = row["write_attempts"]
    prop.next_write_ms = row["next_write_ms"]
    prop.outbox_rev = row["outbox_rev"]
    prop.outbox_fields = row["outbox_fields"] if prop.outbox_rev is not None else 0
    prop.read_error = row["read_error"]


class Checkpointer:
    """Copies the WAL into the database on its own connection and thread, concurrently
    with commits (a PASSIVE checkpoint never blocks the writer). Bound: the WAL is
    checkpointed every ``interval_s``; past ``truncate_bytes`` it is truncated, which may
    make one commit wait."""

    def __init__(self, path: Path, interval_s: float = 0.5, truncate_bytes: int = 64 << 20) -> None:
        self.path, self.interval_s, self.truncate_bytes = path, interval_s, truncate_bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=5000")
        # A checkpoint copies WAL frames to the database file without the page cache:
        # 64 KiB instead of SQLite's default 2 MB.
        conn.execute("PRAGMA cache_size=-64")
        wal = Path(f"{self.path}-wal")
        try:
            while not self._stop.wait(self.interval_s):
                try:
                    size = wal.stat().st_size if wal.exists() else 0
                    mode = "TRUNCATE" if size > self.truncate_bytes else "PASSIVE"
                    conn.execute(f"PRAGMA wal_checkpoint({mode})")
                except sqlite3.Error as exc:
                    log.warning("wal checkpoint failed", extra={"store": str(self.path), "error": str(exc)})
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


CommitMode = Literal["auto", "inline", "thread"]
# In "auto" mode a COMMIT runs on the loop's thread while fsyncs average below this.
INLINE_FSYNC_MS = 2.0


class StoreWriter:
    """Group commit. A batch is staged on the loop's thread; its COMMIT (the fsync)
    runs either right there ("inline") or on one dedicated thread while the loop goes on
    ("thread"). Handing a commit to a thread costs GIL hand-overs between the loop,
    paho's network thread and the writer, which on fast storage cost more than the fsync
    itself (p99 at 2,000 updates/s over 1,000 devices: ~20 ms with spikes past 50 ms,
    against ~14 ms inline, on the reference machine). On slow storage (SD cards, eMMC:
    fsyncs of 10 ms and more) blocking the loop would stall mappers. "auto" measures
    every fsync and commits inline while their moving average stays below
    :data:`INLINE_FSYNC_MS`, on the thread otherwise. paho's thread keeps reading the
    broker either way."""

    def __init__(
        self, store: Store, mode: CommitMode = "auto", clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.store = store
        self.mode = mode
        self._clock = clock  # injectable so a test can play slow or fast storage on any disk
        self.fsync_ms_avg = 0.0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        self._checkpointer = Checkpointer(store.path)

    @property
    def inline(self) -> bool:
        return self.mode == "inline" or (self.mode == "auto" and self.fsync_ms_avg < INLINE_FSYNC_MS)

    async def commit(self, batch: Batch) -> None:
        self.store.stage(batch)
        started = self._clock()
        if self.inline:
            self.store.finish()
        else:
            await asyncio.get_running_loop().run_in_executor(self._executor, self.store.finish)
        took_ms = (self._clock() - started) * 1000
        self.fsync_ms_avg = 0.8 * self.fsync_ms_avg + 0.2 * took_ms

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._checkpointer.close()
