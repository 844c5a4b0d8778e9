"""Walkthroughs in docs/ run as written: every shell block marked ``<!-- doc-test: ... -->``
is run from the repository root, in order, with bash: ``background`` blocks stay running
(until their ``ready on port N`` or ``ready on file PATH`` holds), ``run`` blocks must
exit 0 within a minute. A doc whose commands drift from the code fails here."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MARKED = re.compile(r"<!-- doc-test: (?P<how>[^>]*?) -->\s*```sh\n(?P<body>.*?)```", re.S)
# Every doc with a marked block: README.md and docs/ (a new walkthrough runs without
# being listed here).
WALKTHROUGHS = sorted(
    str(p.relative_to(ROOT))
    for p in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]
    if "<!-- doc-test:" in p.read_text()
)


def blocks(doc: str) -> list[tuple[str, str]]:
    return [(m.group("how").strip(), m.group("body")) for m in MARKED.finditer((ROOT / doc).read_text())]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_ready(how: str, proc: subprocess.Popen[bytes], within: float = 60) -> None:
    deadline = time.monotonic() + within
    port = re.search(r"ready on port (\d+)", how)
    path = re.search(r"ready on file (\S+)", how)
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"background command ended: {proc.args}"
        if (port and port_open(int(port.group(1)))) or (path and Path(path.group(1)).exists()):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{how!r} did not hold within {within} s")


def test_the_walkthroughs_are_found() -> None:
    assert {"README.md", "docs/cluster-devices.md", "docs/mappers/ble.md"} <= set(WALKTHROUGHS)


@pytest.mark.parametrize("doc", WALKTHROUGHS)
def test_a_walkthrough_runs_as_written(doc: str, tmp_path: Path) -> None:
    assert shutil.which("mosquitto_sub"), "scripts/test installs mosquitto-clients"
    found = blocks(doc)
    assert any(how == "run" for how, _ in found), f"no doc-test blocks in {doc}"
    for how, _ in found:
        if (path := re.search(r"ready on file (\S+)", how)) and Path(path.group(1)).exists():
            Path(path.group(1)).unlink()  # from an earlier run: wait for this one's
    background: list[subprocess.Popen[bytes]] = []
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}"}
    script = ""  # run blocks share one shell state (exports), as in a terminal
    try:
        for how, body in found:
            if how.startswith("background"):
                proc = subprocess.Popen(
                    ["bash", "-c", body],
                    cwd=ROOT,
                    env=env,
                    stdout=(tmp_path / f"bg{len(background)}.log").open("wb"),
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                background.append(proc)
                wait_ready(how, proc)
            else:
                assert how == "run", how
                script += body
                result = subprocess.run(
                    ["bash", "-euo", "pipefail", "-c", script],
                    cwd=ROOT,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert result.returncode == 0, f"{doc}:\n{body}\n{result.stdout}\n{result.stderr}"
                script = "".join(line for line in script.splitlines(True) if line.startswith("export "))
    finally:
        for proc in background:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in background:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
