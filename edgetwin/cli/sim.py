"""``edgetwin sim modbus | ble`` and ``edgetwin demo``: the simulated devices and the
self-contained demo, from the stand-ins in ``edgetwin.simulators``."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgetwin.cli.common import run_until_signalled, serve_until_interrupted
from edgetwin.runtime import logs
from edgetwin.simulators import ble, modbus
from edgetwin.simulators.demo import DemoOptions, run_demo


def sim_modbus(args: argparse.Namespace) -> int:
    logs.setup("WARNING")
    return serve_until_interrupted(modbus.serve(args.host, args.port, args.unit), args.host, args.port)


def sim_ble(args: argparse.Namespace) -> int:
    logs.setup("WARNING")
    return serve_until_interrupted(
        ble.serve(args.host, args.port, args.count, args.beacons, args.prefix, args.notify_interval),
        args.host,
        args.port,
    )


def demo(args: argparse.Namespace) -> int:
    logs.setup("WARNING")  # the story says what happens; warnings as key=value lines
    options = DemoOptions(
        story=not args.no_story,
        steps=args.steps,
        cut_s=args.cut_seconds,
        keep_running=args.keep_running,
        duration=args.duration,
        workdir=Path(args.workdir) if args.workdir else None,
        mqtt_port=args.mqtt_port,
    )
    status = [0]

    async def main() -> None:
        status[0] = await run_demo(options)

    run_until_signalled(main())
    return status[0]
