"""What every ``edgetwin`` command shares: exit statuses, the error that carries one,
device arguments, tables, and running a coroutine until a signal stops it."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Coroutine, Sequence
from typing import Any

from edgetwin.deviceapi.types import split_device_id

EXIT_FAILED = 1  # the operation failed: rejected value, no answer, runtime error
EXIT_USAGE = 2  # bad configuration, manifest or arguments


class CliError(Exception):
    """A failure to print as one line (``edgetwin: MESSAGE``) and exit with ``status``."""

    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


def device_arg(text: str) -> str:
    """``NAMESPACE/NAME`` (or a device id ``NAMESPACE.NAME``) as a device id."""
    namespace, sep, name = text.partition("/")
    if not sep:
        namespace, name = split_device_id(text) if "." in text else ("default", text)
    return f"{namespace}.{name}"


def text(value: Any) -> str:
    """A value as a table cell."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def print_table(rows: Sequence[tuple[str, ...]]) -> None:
    """Rows as left-aligned columns, the first row being the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def run_until_signalled(main: Coroutine[Any, Any, Any]) -> None:
    """Run ``main`` until it ends or SIGINT/SIGTERM cancels it (then its cleanup runs).
    Handlers are installed explicitly: a process started in the background by a
    non-interactive shell inherits SIGINT ignored, and must still stop on it."""

    async def runner() -> None:
        task = asyncio.ensure_future(main)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(runner())


def serve_until_interrupted(main: Coroutine[Any, Any, None], host: str, port: int) -> int:
    """Run a server until SIGINT or SIGTERM; a port that cannot be bound is a clear error."""
    try:
        run_until_signalled(main)
    except OSError as exc:
        raise CliError(f"cannot serve on {host}:{port}: {exc}") from None
    return 0
