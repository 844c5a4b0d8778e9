"""Stopping always ends: no loop swallows its cancellation, a failed store ends the
process, and a full disk at start is one clear line, not a traceback.

The chaos harness found a gateway that logged "store write failed; stopping" and then
never ended, so nothing restarted it: Python 3.11's ``asyncio.wait_for`` returns instead
of raising when the cancellation races the awaited event being set (CPython gh-86296),
and the write scheduler's loop went on waiting for good."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import resource
import signal
import subprocess
import time
from pathlib import Path

import pytest

from edgetwin.gateway.config import parse_config
from edgetwin.gateway.service import Gateway, now_ms
from edgetwin.gateway.store.writer import Store
from edgetwin.runtime.aio import cancel_tasks, wait_within
from tests.conftest import (
    EDGETWIN,
    THERMO_PROPS,
    GatewayProcess,
    device_doc,
    model_doc,
    write_config,
    write_manifests,
)
from tests.harness.processes import Mosquitto, free_port

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("gateway", "mappers", "cloud", "deviceapi", "edgetwin")

# How many loop steps after the wake-up the cancellation arrives: one of them is the step
# at which asyncio.wait_for (3.11) has its result and the cancellation at once.
STEPS = range(6)


async def _ends_when_cancelled(task: asyncio.Task[object], wake: asyncio.Event, steps: int) -> bool:
    for _ in range(3):
        await asyncio.sleep(0)  # the loop reaches its wait
    wake.set()
    for _ in range(steps):
        await asyncio.sleep(0)
    task.cancel()
    await asyncio.wait({task}, timeout=2)
    ended = task.done()
    if not ended:  # do not leak it into the next test
        await cancel_tasks([task])
    return ended


@pytest.mark.parametrize("steps", STEPS)
async def test_a_loop_around_wait_within_ends_when_cancelled_as_it_is_woken(steps: int) -> None:
    wake = asyncio.Event()

    async def loop() -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await wait_within(wake.wait(), 30)
            wake.clear()

    assert await _ends_when_cancelled(asyncio.create_task(loop()), wake, steps)


async def test_wait_within_times_out_like_wait_for() -> None:
    never = asyncio.Event()
    with pytest.raises(TimeoutError):
        await wait_within(never.wait(), 0.05)
    assert await wait_within(asyncio.sleep(0, "done"), None) == "done"


@pytest.mark.parametrize("steps", STEPS)
async def test_the_gateways_write_scheduler_ends_when_cancelled_as_it_is_woken(
    steps: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = parse_config(
        {
            "node": "edge-s",
            "store": {"path": str(tmp_path / "s.db")},
            "mqtt": {"url": "mqtt://127.0.0.1:1"},
            "manifests": [],
        }
    )
    gw = Gateway(cfg)
    # A write due in a minute: the scheduler waits for a wake-up with a timeout, as it
    # does whenever a write is pending (the case the chaos run hit).
    monkeypatch.setattr(gw.engine, "next_write_due", lambda deliverable: now_ms() + 60_000)
    task = asyncio.create_task(gw.writes.run())
    assert await _ends_when_cancelled(task, gw.writes.woken, steps)


async def test_cancel_tasks_reports_a_task_that_will_not_end() -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(10)

    task = asyncio.create_task(stubborn(), name="stubborn")
    quick = asyncio.create_task(asyncio.sleep(10), name="quick")
    await asyncio.sleep(0)  # both are running
    assert await cancel_tasks([task, quick], limit_s=0.3) == ["stubborn"]
    assert quick.cancelled()
    release.set()
    assert await cancel_tasks([task], limit_s=5) == []


def test_no_product_code_awaits_with_asyncio_wait_for() -> None:
    """A lint with a reason: any asyncio.wait_for in a loop can make stopping hang (above)."""
    found = []
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (
                    isinstance(node, ast.Attribute)
                    and node.attr == "wait_for"
                    and isinstance(node.value, ast.Name)
                    and node.value.id == "asyncio"
                ):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, f"use deviceapi.aio.wait_within instead of asyncio.wait_for: {found}"


def _limit_file_size() -> None:
    # Writes past 36 KiB fail (EFBIG; Python ignores SIGXFSZ) as on a full disk: the
    # existing store opens (its 32 KiB shared-memory index fits); 300 devices' definitions
    # do not fit in the WAL, so the gateway's first write at start-up fails.
    resource.setrlimit(resource.RLIMIT_FSIZE, (36864, 36864))


def test_a_store_that_cannot_be_written_at_start_is_one_clear_line(tmp_path: Path) -> None:
    """#13: a full disk at start gave a raw sqlite3 traceback from the first write."""
    manifests = write_manifests(
        tmp_path / "m.yaml",
        [
            model_doc("thermostat", "plant", THERMO_PROPS),
            *(device_doc(f"t{i}", "plant", "thermostat", "edge-f") for i in range(300)),
        ],
    )
    store = tmp_path / "store.db"
    Store(store).close()  # an existing, empty store: it opens; writing to it fails
    (tmp_path / "g.yaml").write_text(
        f"node: edge-f\nstore: {{path: {store}}}\n"
        f"mqtt: {{url: 'mqtt://127.0.0.1:{free_port()}'}}\nmanifests: [{manifests}]\n"
    )
    proc = subprocess.run(
        [EDGETWIN, "gateway", "run", "--config", str(tmp_path / "g.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_limit_file_size,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"cannot write store {store}" in proc.stderr, proc.stderr


HANGING_PLUGIN = '''
import asyncio, contextlib
from edgetwin.mappers.sdk import Mapper

class Hang(Mapper):
    """A third-party mapper whose stop() never returns and shrugs off cancellation."""

    async def start(self, devices):
        pass

    async def stop(self):
        while True:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(3600)
'''


def test_a_mapper_that_never_stops_cannot_keep_the_gateway_from_ending(
    tmp_path: Path, mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    (site / "hang_mapper-0.dist-info").mkdir(parents=True)
    (site / "hang_mapper.py").write_text(HANGING_PLUGIN)
    (site / "hang_mapper-0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: hang-mapper\nVersion: 0\n"
    )
    (site / "hang_mapper-0.dist-info" / "entry_points.txt").write_text(
        "[edgetwin.mappers]\nhang = hang_mapper:Hang\n"
    )
    manifests = write_manifests(
        tmp_path / "m.yaml",
        [
            model_doc("thermostat", "plant", THERMO_PROPS),
            device_doc("t1", "plant", "thermostat", "edge-h", protocol={"protocolName": "hang"}),
        ],
    )
    config = write_config(tmp_path, "edge-h", mosquitto.port, manifests)
    monkeypatch.setenv("PYTHONPATH", f"{site}:{ROOT}")
    monkeypatch.setenv("EDGETWIN_STOP_DEADLINE_S", "3")
    gw = GatewayProcess(config, mosquitto.port, "edge-h", tmp_path / "gw.log").start()
    assert gw.proc is not None
    try:
        started = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(timeout=30) == 0  # a clean stop, cut short
        took = time.monotonic() - started
    finally:
        gw.kill()
    log = (tmp_path / "gw.log").read_text()
    assert "stopping took more than 3 s; exiting anyway" in log, log
    assert 3 <= took < 15, took
