"""The edgetwin gateway: one asyncio service per host that keeps durable device twins."""
