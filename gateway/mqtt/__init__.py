"""The MQTT side of the gateway: ``topics`` and ``payloads`` are the contract (see
docs/mqtt.md); ``bus`` is the connection; ``broker`` the optional embedded amqtt."""
