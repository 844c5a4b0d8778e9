"""Inbound MQTT messages on the gateway's topics (docs/mqtt.md): twin updates, gets and
state updates from mappers and apps, membership requests, the broker's drop counter.
Each is applied to the twin engine and answered; the answer and the acknowledgement
wait in :class:`Release` for the commit that makes it durable."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from edgetwin.deviceapi import value_to_text
from edgetwin.gateway.config import MqttConfig
from edgetwin.gateway.dedup import RecentUpdates
from edgetwin.gateway.mqtt import payloads, topics
from edgetwin.gateway.mqtt.bus import Inbound
from edgetwin.gateway.mqtt.payloads import PayloadError
from edgetwin.gateway.ops.metrics import Metrics
from edgetwin.gateway.release import Release
from edgetwin.gateway.twin.engine import TwinEngine
from edgetwin.gateway.twin.model import DesiredRejected, ReportOutcome, TwinError, clip
from edgetwin.runtime import logs

log = logging.getLogger("edgetwin.gateway.service")


def now_ms() -> int:
    return int(time.time() * 1000)


class MqttRouter:
    """Routes each inbound message to the engine and queues its answer."""

    def __init__(
        self,
        node: str,
        mqtt: MqttConfig,
        engine: TwinEngine,
        recent: RecentUpdates,
        metrics: Metrics,
        release: Release,
        wake_writes: Callable[[], None],
    ) -> None:
        self.node, self.mqtt, self.engine, self.recent = node, mqtt, engine, recent
        self.metrics, self.release, self.wake_writes = metrics, release, wake_writes
        self._ratelimit = logs.RateLimit()
        self._broker_dropped_seen: int | None = None

    def on_message(self, msg: Inbound) -> None:
        """Handle one inbound message. Never raises: whatever a peer sends, the message
        is answered (where it can be), counted and acknowledged after the next commit,
        so nothing can wedge the session as a poison message."""
        try:
            self._route(msg)
        except Exception as exc:
            # A bug of ours triggered by this input. Refuse it like bad input: counted,
            # logged (rate-limited, with the traceback), answered and acknowledged.
            if self._ratelimit.allow("internal"):
                log.error(
                    "message handling failed; message refused",
                    extra={"topic": msg.topic[:200], "bytes": len(msg.payload)},
                    exc_info=exc,
                )
            if not self.release.holds(msg):  # never acknowledge one message twice
                reason = f"the gateway could not process this message ({type(exc).__name__})"
                self._reject(msg, "internal", reason)

    def _route(self, msg: Inbound) -> None:
        if msg.topic == topics.BROKER_DROPPED:
            self._broker_dropped(msg.payload)
            return
        if msg.topic == topics.membership_get(self.node):
            event_id = payloads.parse_twin_get(msg.payload, self.mqtt.max_payload)
            served = [d for d in self.engine.devices.values() if d.served]
            body = payloads.membership_get_result(event_id, now_ms(), served)
            self.release.publish(topics.membership_get_result(self.node), body, 1, False)
            self.release.ack(msg)
            return
        route = topics.parse_inbound(msg.topic)
        if route is None:
            self.metrics.inc("rejected_unknown_topic")
            self.release.ack(msg)
            return
        dev = self.engine.devices.get(route.device_id)
        if dev is None:
            self._reject(
                msg,
                "unknown_device",
                f"device {clip(route.device_id, 100)!r} is not defined for node {self.node!r}",
            )
            return
        if not dev.served:
            ready = dev.conditions.get("Ready") or {}
            reason = (
                f"device {route.device_id!r} is not served: {ready.get('message', 'no valid definition')}"
            )
            self._reject(msg, "not_served", reason)
            return
        try:
            if route.action == topics.TWIN_UPDATE:
                self._twin_update(msg, route.device_id)
            elif route.action == topics.TWIN_GET:
                self._twin_get(msg, route.device_id)
            else:
                self._state_update(msg, route.device_id)
        except PayloadError as exc:
            self._reject(msg, exc.kind, exc.reason)
        except TwinError as exc:
            self._reject(msg, "bad_value", str(exc))

    def _broker_dropped(self, payload: bytes) -> None:
        """mosquitto's count of messages it dropped since it started. A rise means the
        broker lost messages it had acknowledged to their publishers (a session queue
        was full: max_queued_messages / max_queued_bytes): counted (metric
        broker_messages_dropped, the broker's total) and warned about."""
        try:
            total = int(payload.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            return
        seen = self._broker_dropped_seen
        self._broker_dropped_seen = total
        self.metrics.total("broker_messages_dropped", total)
        if seen is not None and total > seen and self._ratelimit.allow("broker_dropped"):
            log.warning(
                "the MQTT broker dropped messages it had acknowledged to their publishers (a "
                "client's queue was full; for the gateway's session these are lost updates); raise "
                "its max_queued_messages / max_queued_bytes (docs/mqtt.md, 'Broker settings')",
                extra={"dropped": total - seen, "broker_total": total},
            )
        elif seen is None and total > 0:
            log.warning(
                "the MQTT broker reports messages dropped before the gateway connected",
                extra={"broker_total": total},
            )

    def _reject(self, msg: Inbound, kind: str, reason: str) -> None:
        """Count and log a refused message on one of our inbound topics, answer it on
        ``{topic}/result`` (unless oversize: the payload is not echoed) and acknowledge."""
        self.metrics.inc(f"rejected_{kind}")
        if self._ratelimit.allow(kind):
            log.warning("rejected MQTT message", extra={"topic": msg.topic, "kind": kind, "reason": reason})
        if len(msg.payload) <= self.mqtt.max_payload:
            code = {"unknown_device": 404, "not_served": 409}.get(kind, 400)
            body = payloads.error_result(payloads.event_id_of(msg.payload), now_ms(), code, reason)
            self.release.publish(f"{msg.topic}/result", body, 1, False)
        self.release.ack(msg)

    def _twin_update(self, msg: Inbound, dev_id: str) -> None:
        upd = payloads.parse_twin_update(msg.payload, self.mqtt.max_payload)
        now = now_ms()
        key = self.recent.key(dev_id, upd.event_id, msg.payload)
        seen = self.recent.lookup(key, now, msg.dup)
        if seen is not None:  # applied before (a redelivery): answer again, apply nothing
            self.metrics.inc("duplicates")
            body = seen.answer or payloads.duplicate_result(upd.event_id, now)
            self.release.publish(topics.twin_update_result(dev_id), body, self.mqtt.result_qos, False)
            self.release.ack(msg)
            return
        engine = self.engine
        outcome = (
            engine.apply_reported(dev_id, upd.actual, now, upd.timestamp)
            if upd.actual
            else ReportOutcome({}, {})
        )
        desired_info: dict[str, dict[str, Any]] = {}
        for prop, raw in upd.expected.items():
            try:
                d = engine.apply_desired(dev_id, prop, raw, "edge", now)
            except DesiredRejected as exc:
                outcome.rejected[prop] = exc.reason
                continue
            desired_info[prop] = {
                "value": value_to_text(d.desired.value),
                "metadata": {
                    "origin": d.desired.origin,
                    "stamp": str(d.desired.stamp),
                    "accepted": d.won,
                },
            }
            if d.write_pending:
                self.wake_writes()
        self.count_report(dev_id, outcome)
        dev = engine.devices[dev_id]
        body = payloads.update_result(
            upd.event_id, now, dev, outcome.accepted, outcome.rejected, desired_info
        )
        self.release.publish(topics.twin_update_result(dev_id), body, self.mqtt.result_qos, False)
        self.recent.remember(key, body, now)
        self.release.ack(msg)

    def count_report(self, dev_id: str, outcome: ReportOutcome) -> None:
        if outcome.accepted:
            self.metrics.inc("reported_accepted", len(outcome.accepted))
        if outcome.rejected:
            # Logged with the engine's events (once per change per property), not here.
            self.metrics.inc("rejected_values", len(outcome.rejected))

    def _twin_get(self, msg: Inbound, dev_id: str) -> None:
        event_id = payloads.parse_twin_get(msg.payload, self.mqtt.max_payload)
        body = payloads.get_result(event_id, now_ms(), self.engine.devices[dev_id])
        self.release.publish(topics.twin_get_result(dev_id), body, 1, False)
        self.release.ack(msg)

    def _state_update(self, msg: Inbound, dev_id: str) -> None:
        event_id, state = payloads.parse_state_update(msg.payload, self.mqtt.max_payload)
        self.engine.set_state(dev_id, state, now_ms())
        body = payloads.state_result(event_id, now_ms(), self.engine.devices[dev_id])
        self.release.publish(topics.state_update_result(dev_id), body, 1, False)
        self.release.ack(msg)
        self.wake_writes()  # a device back online resumes its paused writes
