"""Health and watchdog: a loop with work pending and no progress is reported stuck on
/healthz and stops feeding systemd's watchdog. Each loop is wedged for real: the
committer by a commit that does not return, the MQTT bus by a broker that stops
(SIGSTOP: the connection stays up, nothing is acknowledged), the uplink by a link that
swallows everything (the relay never acknowledges)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from lightkube import AsyncClient, KubeConfig

from edgetwin.cloud.relay import read_pki, serve
from edgetwin.cloud.session import RelaySettings
from edgetwin.gateway.config import HealthConfig
from edgetwin.gateway.ops.health import HealthMonitor, Loop
from edgetwin.gateway.service import Gateway
from edgetwin.runtime.sd_notify import Notifier
from edgetwin.simulators.kube.emulator import Emulator
from edgetwin.simulators.kube.running import RunningEmulator
from edgetwin.simulators.link import LinkSim
from tests.conftest import publish, update_payload
from tests.harness.processes import Mosquitto, free_port
from tests.sync.test_cloud_e2e import CRDS, DEV, EXAMPLE, gateway_config, kubectl, pki  # noqa: F401

STUCK_S = 2.0


# --------------------------------------------------------------------- the rule, pure
class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


@given(st.lists(st.tuples(st.booleans(), st.booleans(), st.floats(0.1, 3.0)), max_size=40))
def test_stuck_means_pending_without_progress_for_the_whole_time(
    steps: list[tuple[bool, bool, float]],
) -> None:
    """Against a model: a loop is reported stuck exactly when, at every sample over the
    last ``STUCK_S`` seconds, it had work pending and its progress did not move."""
    clock = Clock()
    state = {"pending": False, "progress": 0}
    loop = Loop("x", lambda: state["pending"], lambda: state["progress"], "work")
    mon = HealthMonitor([loop], STUCK_S, clock)
    stalled_since: float | None = None
    last = None
    for pending, moved, dt in steps:
        clock.now += dt
        state["pending"] = pending
        if moved:
            state["progress"] += 1
        mon.sample()
        if state["progress"] != last or not pending:
            stalled_since = None
        elif stalled_since is None:
            stalled_since = clock.now
        last = state["progress"]
        expect_stuck = stalled_since is not None and clock.now - stalled_since >= STUCK_S
        assert bool(mon.problems()) == expect_stuck


# --------------------------------------------------------------------- sd_notify
def test_notifier_speaks_to_the_socket_systemd_gives(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    try:
        n = Notifier(
            {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
        )
        assert n.watchdog_interval_s == 15.0
        n.send("READY=1")
        assert sock.recv(100) == b"READY=1"
        n.close()
    finally:
        sock.close()
    # A reader that does not keep up never blocks the gateway: datagrams are dropped.
    full = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    full.bind(str(tmp_path / "full"))
    try:
        n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "full")})
        started = time.monotonic()
        for _ in range(1000):
            n.send("WATCHDOG=1")
        assert time.monotonic() - started < 1.0 and n.enabled
    finally:
        full.close()
    # Not ours (another PID) or outside systemd: no watchdog, nothing sent.
    assert (
        Notifier(
            {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}
        ).watchdog_interval_s
        is None
    )
    assert not Notifier({}).enabled


# --------------------------------------------------------------------- the gateway, wedged
@pytest.fixture
async def stack(
    tmp_path: Path,
    mosquitto: Mosquitto,
    pki: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[dict[str, Any]]:
    notify = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # a ping every 0.5 s (sampled every 1 s)
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    async with RunningEmulator(Emulator.from_files(CRDS)) as api:
        api.kubeconfig(tmp_path / "kc", "plant")
        assert (await kubectl(tmp_path, "apply", "-f", str(EXAMPLE))).returncode == 0
        client = AsyncClient(config=KubeConfig.from_file(tmp_path / "kc"))
        server, _, port = await serve(client, "127.0.0.1:0", *read_pki(pki), RelaySettings(flush_s=0.01))
        link = LinkSim("127.0.0.1", port)
        await link.start()
        cfg = gateway_config(tmp_path, mosquitto, pki, link.port)
        hport = free_port()
        cfg.health = HealthConfig(listen=f"127.0.0.1:{hport}", stuck_after=int(STUCK_S * 1000))
        gw = Gateway(cfg)
        stop = asyncio.Event()
        task = asyncio.create_task(gw.run(stop))
        await asyncio.wait_for(gw.ready.wait(), 15)
        web = httpx.AsyncClient(base_url=f"http://127.0.0.1:{hport}", timeout=5)
        try:
            yield {"gw": gw, "web": web, "link": link, "notify": sock, "mosquitto": mosquitto}
        finally:
            await web.aclose()
            stop.set()
            await asyncio.wait_for(task, 30)
            await server.stop(None)
            await link.stop()
            await client.close()
            sock.close()


def pings(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(100))
        except BlockingIOError:
            return out


async def healthz(web: httpx.AsyncClient) -> tuple[int, list[str]]:
    r = await web.get("/healthz")
    return r.status_code, r.json()["problems"]


async def wait_health(web: httpx.AsyncClient, good: bool, within: float = 15) -> list[str]:
    deadline = time.monotonic() + within
    while True:
        code, problems = await healthz(web)
        if (code == 200) == good:
            return problems
        assert time.monotonic() < deadline, f"health still {code} {problems}"
        await asyncio.sleep(0.2)


async def report(port: int, value: str, event: str) -> None:
    await asyncio.to_thread(
        publish, port, f"$hw/events/device/{DEV}/twin/update", update_payload({"temperature": value}, event)
    )


async def test_healthy_gateway_answers_200_feeds_the_watchdog_and_serves_metrics(
    stack: dict[str, Any],
) -> None:
    web, sock = stack["web"], stack["notify"]
    await wait_health(web, good=True)
    await asyncio.sleep(2.5)
    got = pings(sock)
    assert got[0] == b"READY=1" and got.count(b"WATCHDOG=1") >= 2
    await report(stack["mosquitto"].port, "21.5", "m1")
    await asyncio.sleep(1.0)
    metrics = (await web.get("/metrics")).text
    assert "edgetwin_gateway_commits_total" in metrics
    assert "edgetwin_gateway_commit_seconds_count" in metrics
    assert "edgetwin_gateway_uplink_connected 1.0" in metrics
    assert "edgetwin_gateway_outbox_oldest_age_seconds" in metrics


async def test_a_commit_that_never_returns_is_reported_and_starves_the_watchdog(
    stack: dict[str, Any],
) -> None:
    gw, web, sock = stack["gw"], stack["web"], stack["notify"]
    await wait_health(web, good=True)
    release = asyncio.Event()
    commit = gw.writer.commit

    async def wedged(batch: Any) -> None:
        await release.wait()  # e.g. a disk whose fsync hangs
        await commit(batch)

    gw.writer.commit = wedged
    try:
        await report(stack["mosquitto"].port, "22.5", "w1")
        problems = await wait_health(web, good=False)
        assert any(p.startswith("committer stuck") for p in problems), problems
        pings(sock)
        await asyncio.sleep(1.5)
        assert b"WATCHDOG=1" not in pings(sock)  # systemd would restart it now
    finally:
        gw.writer.commit = commit
        release.set()
    await wait_health(web, good=True)


async def test_a_broker_that_stops_acknowledging_is_reported(stack: dict[str, Any]) -> None:
    gw, web = stack["gw"], stack["web"]
    broker = stack["mosquitto"].proc
    await wait_health(web, good=True)
    os.kill(broker.pid, signal.SIGSTOP)
    try:
        # The gateway publishes (a retained value, as after a commit); nothing comes back.
        assert gw.bus.publish("edgetwin/health-test", b"x", 1, False)
        problems = await wait_health(web, good=False)
        assert any(p.startswith("mqtt stuck") for p in problems), problems
    finally:
        os.kill(broker.pid, signal.SIGCONT)
    await wait_health(web, good=True)


async def test_a_link_that_swallows_frames_is_reported_before_it_is_declared_dead(
    stack: dict[str, Any],
) -> None:
    gw, web, link = stack["gw"], stack["web"], stack["link"]
    await asyncio.wait_for(gw.uplink.connected.wait(), 15)
    await wait_health(web, good=True)
    link.blackhole()
    try:
        await report(stack["mosquitto"].port, "23.5", "u1")
        problems = await wait_health(web, good=False)
        assert any(p.startswith("uplink stuck") for p in problems), problems
    finally:
        link.restore()
    await wait_health(web, good=True, within=60)
