"""systemd's notify protocol (sd_notify(3)) without libsystemd: READY=1 when serving,
WATCHDOG=1 while healthy. A datagram to $NOTIFY_SOCKET; a no-op outside systemd."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        # An abstract socket is given as "@name".
        self.address = "\0" + path[1:] if path.startswith("@") else path
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        watchdog = usec.isdigit() and (not pid or pid == str(os.getpid()))
        # systemd's advice: ping at half the interval.
        self.watchdog_interval_s: float | None = int(usec) / 2e6 if watchdog else None
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, state: str) -> None:
        if not self.address:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # Never block the event loop: a reader that does not keep up (its queue
                # full) loses this datagram; the next ping comes soon.
                self._sock.setblocking(False)
            self._sock.sendto(state.encode(), self.address)
        except BlockingIOError:
            return
        except OSError as exc:  # systemd went away or the socket is wrong: say so once
            log.warning("cannot notify systemd", extra={"socket": self.address, "error": str(exc)})
            self.address = ""

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


__all__ = ["Notifier"]
