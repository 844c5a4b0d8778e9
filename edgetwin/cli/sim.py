"""``edgetwin sim modbus | ble`` and ``edgetwin demo``: the simulated devices and the
self-contained demo, from the stand-ins in ``edgetwin.simulators``."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgetwin.cli.common import run_until_signalled, serve_until_interrupted
from edgetwin.simulators import ble, modbus
from edgetwin.simulators.demo import run_demo


def sim_modbus(args: argparse.Namespace) -> int:
    return serve_until_interrupted(modbus.serve(args.host, args.port, args.unit), args.host, args.port)


def sim_ble(args: argparse.Namespace) -> int:
    return serve_until_interrupted(
        ble.serve(args.host, args.port, args.count, args.beacons, args.prefix, args.notify_interval),
        args.host,
        args.port,
    )


def demo(args: argparse.Namespace) -> int:
    run_until_signalled(
        run_demo(
            duration=args.duration,
            live=not args.no_live,
            cloud=args.cloud,
            workdir=Path(args.workdir) if args.workdir else None,
            mqtt_port=args.mqtt_port,
        )
    )
    return 0
