"""What the next commit releases: acknowledgements of inbound MQTT messages, answers and
retained values to publish, deltas for external mappers, and waiters (mapper reports).
Everything here waits for the commit that holds what it answers (DESIGN.md: nothing is
acknowledged before it is durable); bounded by what arrives between two commits, which
the MQTT session's in-flight window bounds."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from edgetwin.gateway.mqtt.bus import Inbound

Publish = tuple[str, bytes, int, bool]  # topic, payload, qos, retain
Delta = tuple[str, list[str], str, bytes]  # device, properties, topic, payload


@dataclass
class Taken:
    """One commit's share of :class:`Release`."""

    acks: list[Inbound]
    pubs: list[Publish]
    deltas: list[Delta]
    retained: set[tuple[str, str]]
    waiters: list[asyncio.Future[None]]


@dataclass
class Release:
    acks: list[Inbound] = field(default_factory=list)
    pubs: list[Publish] = field(default_factory=list)
    # Deltas for external mappers. One that cannot be handed to the broker gives its
    # attempts back (TwinEngine.write_undelivered).
    deltas: list[Delta] = field(default_factory=list)
    # Properties whose retained values are sent again (after a reconnect).
    retained: set[tuple[str, str]] = field(default_factory=set)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    # Set when something waits for a commit.
    dirty: asyncio.Event = field(default_factory=asyncio.Event)

    def changed(self) -> None:
        """Something changed that the next commit must carry."""
        self.dirty.set()

    def ack(self, msg: Inbound) -> None:
        """Acknowledge ``msg`` after the next commit (in order with the rest)."""
        self.acks.append(msg)
        self.dirty.set()

    def holds(self, msg: Inbound) -> bool:
        return any(m is msg for m in self.acks)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.pubs.append((topic, payload, qos, retain))

    def committed(self) -> asyncio.Future[None]:
        """A future resolved by the commit that includes everything done so far."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        self.dirty.set()
        return fut

    def take(self) -> Taken:
        """Everything waiting now, for the commit about to run; starts afresh."""
        self.dirty.clear()
        taken = Taken(self.acks, self.pubs, self.deltas, self.retained, self.waiters)
        self.acks, self.pubs, self.deltas, self.retained, self.waiters = [], [], [], set(), []
        return taken
