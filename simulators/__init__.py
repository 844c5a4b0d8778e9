"""Stand-ins for the world around edgetwin, for the demo, tests and benchmarks; never
production: a Kubernetes API emulator (``kube``), a narrowband link (``link``), a Modbus
boiler (``modbus``), BLE peripherals on Bumble (``ble``), and a whole system on loopback
(``stack``, ``demo``). Product code never imports this package (tests/test_layout.py)."""
