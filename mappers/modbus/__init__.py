"""The Modbus mapper (TCP, RTU, RTU over TCP) — in progress.

Done: visitor and connection config with validation (``config``), the register codec
for every data type and byte/word order (``codec``), and read planning (``planner``).
The polling runtime on pymodbus, the simulator and the entry point follow; until then no
``modbus`` mapper is registered, so devices with ``protocolName: modbus`` are left to
external mappers (the gateway says so in its log).
"""
