"""An MQTT broker inside the gateway process (amqtt), for hosts with no mosquitto and
for the demo. Always bound to the configured host and port: amqtt's own default would
listen on every interface.

Caveat, stated in docs/configuration.md: the embedded broker keeps sessions in memory, so
a message a mapper published and the broker acknowledged, but that the gateway had not
yet committed, is lost if the whole process dies. Use mosquitto with persistence where
that matters.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class BrokerStartError(RuntimeError):
    """The embedded broker could not start (e.g. its port is taken)."""


class EmbeddedBroker:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._broker: Any = None

    async def start(self) -> None:
        # Imported here: only embedded setups pay for amqtt.
        from amqtt.broker import Broker

        class _Broker(Broker):  # type: ignore[misc]
            """amqtt (since 0.11.2, Yakifo/amqtt#245) refuses every client publish to a
            topic starting with '$', which the MQTT spec only recommends. KubeEdge's
            device topics live under '$hw/', so exactly that namespace is let through,
            routed the way amqtt routes any other publish. $SYS stays closed."""

            async def _handle_message_delivery(self, session: Any, handler: Any, wait_deliver: Any) -> bool:
                message = wait_deliver.result()
                if message is None or not str(message.topic).startswith("$hw/"):
                    return bool(await super()._handle_message_delivery(session, handler, wait_deliver))
                if "#" in message.topic or "+" in message.topic:
                    return False
                if await self._topic_filtering(session, topic=message.topic, action=_publish_action()):
                    await self._broadcast_message(session, message.topic, message.data)
                    if message.publish_packet and message.publish_packet.retain_flag:
                        await self.retain_message(session, message.topic, message.data, message.qos)
                return True

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            },
        }
        self._broker = _Broker(config)
        # amqtt logs its own traceback when it cannot start; the error raised below says
        # it in one line, so its logger is quiet for the start only.
        amqtt_log = logging.getLogger("amqtt.broker")
        level = amqtt_log.level
        amqtt_log.setLevel(logging.CRITICAL)
        try:
            await self._broker.start()
        except Exception as exc:
            self._broker = None
            raise BrokerStartError(
                f"embedded MQTT broker cannot listen on {self.host}:{self.port}: {exc}"
            ) from exc
        finally:
            amqtt_log.setLevel(level)
        log.info("embedded broker listening", extra={"bind": f"{self.host}:{self.port}"})

    async def stop(self) -> None:
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None


def _publish_action() -> Any:
    from amqtt.contexts import Action

    return Action.PUBLISH
