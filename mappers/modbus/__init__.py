"""The Modbus mapper: TCP, RTU and RTU over TCP devices onto twins (docs/mappers/modbus.md).

``config`` validates connections and visitors, ``codec`` converts registers exactly,
``planner`` finds the fewest requests, ``mapper`` runs polling and writes on pymodbus,
``sim`` is the boiler simulator behind ``edgetwin sim modbus``.
"""
