"""What the gateway, the relay and the mappers share at run time, apart from any contract:
asyncio helpers that always stop, structured logs, the operations HTTP server, systemd's
notify protocol, heap trimming and the installed version."""
