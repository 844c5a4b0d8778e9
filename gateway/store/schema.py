"""The SQLite schema of the gateway store, versioned with ``PRAGMA user_version``.

Every change to the schema is a new entry at the end of :data:`MIGRATIONS`; a store is
brought up to date at open, one migration per transaction. Never edit a shipped entry.
"""

from __future__ import annotations

import sqlite3

MIGRATIONS: list[tuple[str, list[str]]] = [
    (
        "initial schema",
        [
            # Key/value facts about this store: node name, HLC high-water mark.
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
            # Device and DeviceModel objects as loaded (from manifests or, later, the cloud).
            """CREATE TABLE objects (
                kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL,
                source TEXT NOT NULL, resource_version TEXT, body TEXT NOT NULL,
                PRIMARY KEY (kind, namespace, name)) WITHOUT ROWID""",
            # One row per twin property. Values are JSON text.
            """CREATE TABLE twin_property (
                device_id TEXT NOT NULL, property TEXT NOT NULL,
                reported_value TEXT, reported_ts INTEGER, reported_version INTEGER,
                last_version INTEGER NOT NULL DEFAULT 0,
                desired_value TEXT, desired_origin TEXT, desired_stamp TEXT,
                desired_acked INTEGER NOT NULL DEFAULT 1,
                desired_outbox_revision INTEGER NOT NULL DEFAULT 0,
                spec_desired TEXT,
                write_state TEXT NOT NULL DEFAULT '', write_reason TEXT NOT NULL DEFAULT '',
                write_attempts INTEGER NOT NULL DEFAULT 0, next_write_ms INTEGER,
                outbox_rev INTEGER, read_error TEXT NOT NULL DEFAULT '',
                PRIMARY KEY (device_id, property)) WITHOUT ROWID""",
            """CREATE TABLE device_state (
                device_id TEXT PRIMARY KEY, state TEXT NOT NULL,
                last_online_ms INTEGER) WITHOUT ROWID""",
            # The outbox: at most one composed pending status patch per device. Stored in
            # two parts: twin_property.outbox_rev marks the properties pending (their
            # current status is the composition), and this row holds the device-level
            # fields (state, lastOnlineTime, conditions) and the revision.
            """CREATE TABLE outbox (
                device_id TEXT PRIMARY KEY, device_patch TEXT NOT NULL,
                revision INTEGER NOT NULL) WITHOUT ROWID""",
            # Bounded event log (conflicts, rejected values, failed writes, state changes).
            """CREATE TABLE events (
                id INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL, device_id TEXT NOT NULL,
                property TEXT NOT NULL, kind TEXT NOT NULL, detail TEXT NOT NULL)""",
            "CREATE INDEX events_device ON events (device_id, id)",
        ],
    ),
    (
        "event classes: noisy kinds are trimmed before important ones",
        [
            # important = 0 for kinds a faulty device can repeat (rejected values, read
            # errors, state flaps, skipped cycles); the log drops those first, so they
            # never push conflicts and failed writes out.
            "ALTER TABLE events ADD COLUMN important INTEGER NOT NULL DEFAULT 1",
            "UPDATE events SET important = 0 WHERE kind IN ('rejected', 'read_error', 'state')",
            "CREATE INDEX events_class ON events (important, id)",
        ],
    ),
    (
        "recently applied twin/update messages (gateway/dedup.py)",
        [
            # The newest updates applied, so a redelivery after a crash between commit and
            # acknowledgement is answered again, not applied twice. Bounded: rows below
            # the newest `capacity` are deleted with each commit.
            """CREATE TABLE recent_updates (
                seq INTEGER PRIMARY KEY, device_id TEXT NOT NULL, event_id TEXT NOT NULL,
                digest INTEGER NOT NULL, ts_ms INTEGER NOT NULL, answer BLOB NOT NULL)""",
        ],
    ),
    (
        "devices from the cluster: objects by source, served definitions, conditions",
        [
            # The same object may come from a local manifest and from the cluster.
            """CREATE TABLE objects_by_source (
                source TEXT NOT NULL, kind TEXT NOT NULL, namespace TEXT NOT NULL,
                name TEXT NOT NULL, resource_version TEXT, body TEXT NOT NULL,
                PRIMARY KEY (source, kind, namespace, name)) WITHOUT ROWID""",
            """INSERT INTO objects_by_source
                SELECT source, kind, namespace, name, resource_version, body FROM objects""",
            "DROP TABLE objects",
            "ALTER TABLE objects_by_source RENAME TO objects",
            # What each device is served with (gateway/registry.py): kept so that a
            # gateway restarted offline serves exactly what it served before, and an
            # invalid cluster update leaves the previous definition in service.
            """CREATE TABLE served (
                device_id TEXT PRIMARY KEY, source TEXT NOT NULL, generation INTEGER NOT NULL,
                resource_version TEXT NOT NULL, device TEXT NOT NULL, model TEXT NOT NULL)
                WITHOUT ROWID""",
            "ALTER TABLE device_state ADD COLUMN conditions TEXT NOT NULL DEFAULT '{}'",
            "ALTER TABLE device_state ADD COLUMN observed_generation INTEGER NOT NULL DEFAULT 0",
            # A random id per store: a store that was lost and made anew has another one.
            "INSERT OR IGNORE INTO meta VALUES ('store_id', lower(hex(randomblob(8))))",
        ],
    ),
    (
        "since when each outbox entry has been pending (the Gateway's oldestPendingTime)",
        [
            # Wall milliseconds; NULL in rows from before (the revision bounds it then).
            "ALTER TABLE outbox ADD COLUMN since_ms INTEGER",
        ],
    ),
    (
        "which status fields of a property are pending in the outbox",
        [
            # REPORTED 1 | DESIRED 2 | READ_ERROR 4 (gateway/twin/engine.py); rows from
            # before: all of them, so a restore sends whatever the property holds.
            "ALTER TABLE twin_property ADD COLUMN outbox_fields INTEGER NOT NULL DEFAULT 7",
        ],
    ),
]

# Event kinds a faulty device or peer can repeat; the event log trims them first.
NOISY_EVENT_KINDS = frozenset({"rejected", "read_error", "state", "cycles_skipped"})

SCHEMA_VERSION = len(MIGRATIONS)


class StoreError(RuntimeError):
    """The store could not be opened or written; carries the path."""


class SchemaTooNew(RuntimeError):
    """The store was written by a newer edgetwin; refusing to touch it."""


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the store at ``conn`` to :data:`SCHEMA_VERSION`; return the version found."""
    found = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if found > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"store schema version {found} is newer than this edgetwin's {SCHEMA_VERSION}; "
            "upgrade edgetwin or point store.path at another file"
        )
    for version in range(found, SCHEMA_VERSION):
        _, statements = MIGRATIONS[version]
        # The connection is in autocommit mode: DDL and the version bump commit together.
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sql in statements:
                conn.execute(sql)
            conn.execute(f"PRAGMA user_version = {version + 1}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    return found
