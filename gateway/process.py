"""The gateway as a process: runs the service until SIGINT or SIGTERM, and ends the
process within a deadline once stopping begins, so a supervisor restarts it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading

from edgetwin.gateway.config import GatewayConfig
from edgetwin.gateway.service import Gateway

# Once the gateway begins to stop, how long stopping may take (its own bounded steps, then
# the asyncio runner's: stray tasks, worker threads) before the process ends anyway. A
# supervisor (systemd's Restart=, a container runtime) restarts only a process that ended.
# $EDGETWIN_STOP_DEADLINE_S overrides it (seconds).
STOP_DEADLINE_S = 40.0
EXIT_FAILED = 1


def exit_anyway_after(seconds: float, status: int) -> None:
    """End the process with ``status`` in ``seconds`` unless it has ended by then."""

    def hard_exit() -> None:
        print(f"edgetwin: stopping took more than {seconds:.0f} s; exiting anyway", file=sys.stderr)
        sys.stderr.flush()
        os._exit(status)

    timer = threading.Timer(seconds, hard_exit)
    timer.daemon = True
    timer.start()


async def run_gateway(cfg: GatewayConfig) -> int:
    """Serve ``cfg`` until a signal asks to stop or the gateway stops by itself (a
    failed store); in the second case the process exits 1 so that it is restarted."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    gateway = Gateway(cfg)
    running = asyncio.ensure_future(gateway.run(stop))
    stopping = asyncio.ensure_future(gateway.stopping.wait())
    await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    # A failure exits 1 even when the deadline cuts the rest of the stop short.
    deadline = float(os.environ.get("EDGETWIN_STOP_DEADLINE_S") or STOP_DEADLINE_S)
    exit_anyway_after(deadline, 0 if stop.is_set() else EXIT_FAILED)
    await running
    return 0
