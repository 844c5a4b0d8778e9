"""Processes for the tests, the benchmarks and the chaos harness, written once: free
loopback ports, waiting for a port, a private mosquitto, a subprocess to kill and
restart, and a process's resident memory."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import textwrap
import time
from pathlib import Path

from edgetwin.simulators.stack import free_port

__all__ = ["Mosquitto", "Proc", "free_port", "mosquitto_binary", "rss_mb", "wait_port"]


def wait_port(port: int, timeout: float = 10.0) -> None:
    """Block until something accepts connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if not found:
        raise RuntimeError("mosquitto is not installed; scripts/test installs it")
    return found


class Mosquitto:
    """A private mosquitto on a free loopback port (``extra``: more config lines)."""

    def __init__(self, workdir: Path, extra: str = "", max_queued: int = 200_000) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            textwrap.dedent(
                f"""
                listener {self.port} 127.0.0.1
                allow_anonymous true
                set_tcp_nodelay true
                persistence false
                max_queued_messages {max_queued}
                max_inflight_messages 1000
                log_dest file {workdir / "mosquitto.log"}
                """
            )
            + extra
        )
        self.start()

    def start(self) -> None:
        """(Re)start the broker on the same port and config."""
        self.proc = subprocess.Popen(
            [mosquitto_binary(), "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_port(self.port)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Proc:
    """A subprocess to start, kill and restart, its output appended to ``log``."""

    def __init__(self, args: list[str], log: Path, stdin: bool = False) -> None:
        self.args, self.log, self.stdin = args, log, stdin
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.args,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.PIPE if self.stdin else subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 20) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def send(self, line: str) -> None:
        if self.running and self.proc is not None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.write(line.encode() + b"\n")
                self.proc.stdin.flush()


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of ``pid`` in MB (0.0 once it has ended). ``field`` picks a part
    of /proc/PID/status: ``RssAnon`` (heap and other private memory) or ``RssFile``
    (pages of mapped files: libraries' code, shared and droppable under pressure)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return 0.0
