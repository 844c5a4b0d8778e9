#!/usr/bin/env python3
"""Fleet benchmark: what one relay replica carries.

    .venv/bin/python -m scripts.bench.fleet [--gateways 1000] [--devices 20] [--every 10]

Simulated gateways run the real uplink (gateway.uplink.Uplink over gRPC with mutual TLS,
one client certificate per node) on the real twin engine, a few hundred per worker
process; each device reports a new value every --every seconds. The relay is
`edgetwin cloud run` (a process, as deployed) against the Kubernetes API emulator
(edgetwin.simulators.kube.emulator, a process of its own, so it shares no event loop with the
balancer), reached through a TCP balancer in this process, as gateways reach a Service.
--phases picks which of the three phases below run (default all). Printed:

  * connect: seconds until every gateway is welcomed;
  * steady state: relay CPU (cores) and RSS per connected gateway (RSS with the fleet
    minus RSS idle, over gateways), status messages/s in, API requests/s and status
    writes/s out; the baseline in the same run is one write per device change (what a
    gateway writing straight to the API would send): the ratio is writes / changes;
  * reconnect storm: the relay is killed while devices change, then restarted; seconds
    until every gateway is back and every outbox empty, and the most API requests the
    emulator saw in any second against the relay's apiQPS + apiBurst;
  * failover: a second replica joins the balancer, the first is killed; seconds until
    every gateway is on the second and every outbox empty, and whether the cloud holds
    every device's last value (nothing lost).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from edgetwin.deploy import crd_files
from tests.harness.processes import free_port, rss_mb

ROOT = Path(__file__).resolve().parents[2]

NAMESPACE = "fleet"
PROPS = ("temperature", "humidity", "state")


# --------------------------------------------------------------------- PKI
def make_pki(out: Path, nodes: list[str]) -> None:
    """CA, relay certificate and one client certificate per node, as make-test-pki
    writes them (EC P-256), made in-process: a thousand openssl runs take minutes."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        (out / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (out / f"{stem}-key.pem").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("fleet CA"))
        .issuer_name(name("fleet CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    (out / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def issue(stem: str, cn: str, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName]) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        write(stem, key, cert)

    import ipaddress

    issue(
        "relay",
        "edgetwin-relay",
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    for node in nodes:
        issue(node, node, ExtendedKeyUsageOID.CLIENT_AUTH, [x509.DNSName(node)])


def node_name(i: int) -> str:
    return f"edge-{i:04d}"


def device_docs(node: str, devices: int) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "edgetwin.io/v1alpha1",
            "kind": "Device",
            "metadata": {"name": f"{node}-d{d:02d}", "namespace": NAMESPACE},
            "spec": {"deviceModelRef": {"name": "sensor"}, "nodeName": node},
        }
        for d in range(devices)
    ]


MODEL = {
    "apiVersion": "edgetwin.io/v1alpha1",
    "kind": "DeviceModel",
    "metadata": {"name": "sensor", "namespace": NAMESPACE},
    "spec": {
        "properties": [
            {"name": "temperature", "type": "FLOAT"},
            {"name": "humidity", "type": "FLOAT"},
            {"name": "state", "type": "STRING"},
        ]
    },
}


# --------------------------------------------------------------------- worker process
async def worker(spec: dict[str, Any]) -> None:
    """Run spec["nodes"] simulated gateways; a JSON line of totals on stdout each second.
    Commands on stdin: "pause", "resume", "dump" (each device's last value, as JSON)."""
    import logging

    from edgetwin.deviceapi import Device, DeviceModel
    from edgetwin.gateway.config import UplinkConfig
    from edgetwin.gateway.twin.engine import TwinEngine
    from edgetwin.gateway.uplink import Uplink

    logging.basicConfig(level=logging.ERROR)
    pki = Path(spec["pki"])
    model = DeviceModel.model_validate(MODEL)
    gateways: list[tuple[str, TwinEngine, Uplink]] = []
    tasks = []
    for node in spec["nodes"]:
        engine = TwinEngine()
        for doc in device_docs(node, spec["devices"]):
            engine.upsert_device(Device.model_validate(doc), model)
        cfg = UplinkConfig(
            address=spec["address"],
            ca_file=pki / "ca.pem",
            cert_file=pki / f"{node}.pem",
            key_file=pki / f"{node}-key.pem",
            server_name="localhost",
            reconnect_max_ms=10_000,
        )
        up = Uplink(cfg, engine, lambda: None, lambda msg: None, {}, f"store-{node}", "bench")
        gateways.append((node, engine, up))
        tasks.append(asyncio.create_task(up.run()))
    every, devices = spec["every"], spec["devices"]
    running = True
    last: dict[str, Any] = {}

    async def commands() -> None:
        nonlocal running
        reader = asyncio.StreamReader()
        await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
        )
        while line := (await reader.readline()).decode().strip():
            if line == "pause":
                running = False
            elif line == "resume":
                running = True
            elif line == "dump":
                print(json.dumps({"dump": last}), flush=True)

    cmd_task = asyncio.create_task(commands())
    # Each device reports every `every` seconds, the fleet's devices spread evenly over it.
    all_devices = [
        (engine, up, f"{NAMESPACE}.{node}-d{d:02d}") for node, engine, up in gateways for d in range(devices)
    ]
    tick, step = 0.1, 0
    per_tick = len(all_devices) * tick / every
    due = 0.0
    next_report = time.monotonic()
    value = 0
    while True:
        await asyncio.sleep(tick)
        if running:
            due += per_tick
            while due >= 1:
                due -= 1
                engine, up, dev = all_devices[step % len(all_devices)]
                step += 1
                value += 1
                now = int(time.time() * 1000)
                engine.apply_reported(dev, {"temperature": value / 10, "humidity": 50.0, "state": "ok"}, now)
                last[dev] = value / 10
                up.notify()
        for _, engine, _ in gateways:
            engine.drain()  # what the gateway's committer does; here nothing is stored
        if time.monotonic() >= next_report:
            next_report += 1.0
            print(
                json.dumps(
                    {
                        "connected": sum(up.connected.is_set() for _, _, up in gateways),
                        "outbox": sum(len(engine.outbox) for _, engine, _ in gateways),
                        "applied": sum(up.applied for _, _, up in gateways),
                        "connects": sum(up.connects for _, _, up in gateways),
                        "changes": step,
                    }
                ),
                flush=True,
            )
        if cmd_task.done():
            break
    for task in tasks:
        task.cancel()


# --------------------------------------------------------------------- the API emulator
def emulator_process(conn: Any, kubeconfig: Path, gateways: int, devices: int) -> None:
    """The API emulator in a process of its own, filled with the fleet's objects. Writes
    a kubeconfig for it and says so on ``conn``, then answers "stats" (status writes,
    request counts by verb), "times" (request arrival times) and "clear" (forget them)
    until the pipe closes."""
    asyncio.run(_serve_emulator(conn, kubeconfig, gateways, devices))


async def _serve_emulator(conn: Any, kubeconfig: Path, gateways: int, devices: int) -> None:
    from edgetwin.simulators.kube.emulator import Emulator
    from edgetwin.simulators.kube.running import RunningEmulator

    emulator = Emulator.from_files(crd_files(), compact_s=300)
    devices_res = emulator.resources[("edgetwin.io", "v1alpha1", "devices")]
    models_res = emulator.resources[("edgetwin.io", "v1alpha1", "devicemodels")]
    emulator.create(models_res, NAMESPACE, json.loads(json.dumps(MODEL)))
    for i in range(gateways):
        for doc in device_docs(node_name(i), devices):
            emulator.create(devices_res, NAMESPACE, doc)
    loop = asyncio.get_running_loop()
    closed = loop.create_future()

    def command() -> None:
        try:
            what = conn.recv()
        except EOFError:
            loop.remove_reader(conn.fileno())
            closed.set_result(None)
            return
        if what == "clear":
            emulator.request_times.clear()
            conn.send(None)
        elif what == "stats":
            conn.send(
                {
                    "writes": sum(emulator.status_writes.values()),
                    "requests": len(emulator.request_times),
                    "verbs": verbs(emulator.stats),
                }
            )
        elif what == "times":
            conn.send(list(emulator.request_times))

    async with RunningEmulator(emulator) as api:
        api.kubeconfig(kubeconfig, NAMESPACE)
        conn.send(None)
        loop.add_reader(conn.fileno(), command)
        await closed


class EmulatorProcess:
    def __init__(self, kubeconfig: Path, gateways: int, devices: int) -> None:
        import multiprocessing

        self._conn, child = multiprocessing.Pipe()
        self.proc = multiprocessing.get_context("fork").Process(
            target=emulator_process, args=(child, kubeconfig, gateways, devices), daemon=True
        )
        self.proc.start()
        child.close()

    async def start(self) -> None:
        await asyncio.to_thread(self._conn.recv)

    async def ask(self, what: str) -> Any:
        self._conn.send(what)
        return await asyncio.to_thread(self._conn.recv)

    def stop(self) -> None:
        self._conn.close()
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()


# --------------------------------------------------------------------- the balancer
class Balancer:
    """A TCP balancer: each new connection goes to the next live backend, round robin,
    as a Kubernetes Service spreads connections over ready pods."""

    def __init__(self) -> None:
        self.backends: list[int] = []
        self.port = 0
        self._next = 0
        self._server: asyncio.Server | None = None
        self._conns: dict[int, set[asyncio.StreamWriter]] = {}

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=4096)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop accepting and cut every connection, so each pipe ends before the loop
        does (cancelled at the loop's end, they print tracebacks)."""
        if self._server is not None:
            self._server.close()
        for backend in list(self._conns):
            for w in self._conns.pop(backend):
                w.transport.abort()
        await asyncio.sleep(0.1)

    def drop(self, backend: int) -> None:
        """The backend died: cut its connections (as the kernel resets them)."""
        self.backends.remove(backend)
        for w in self._conns.pop(backend, set()):
            w.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(len(self.backends) or 1):
            if not self.backends:
                break
            backend = self.backends[self._next % len(self.backends)]
            self._next += 1
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", backend)
            except OSError:
                continue
            conns = self._conns.setdefault(backend, set())
            conns.update((writer, up_writer))

            async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                    while data := await r.read(65536):
                        w.write(data)
                        await w.drain()
                w.transport.abort()

            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
            conns.discard(writer)
            conns.discard(up_writer)
            return
        writer.transport.abort()


# --------------------------------------------------------------------- processes
def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def verbs(stats: Any) -> Counter[str]:
    """The emulator's request counts by HTTP method and resource (WATCH: the start of a
    watch; GET: reads and lists; the emulator counts a namespaced request by the path before /namespaces/,
    so a Device read or write in its namespace shows as ``namespaced``)."""
    out: Counter[str] = Counter()
    for key, n in stats.items():
        method, _, path = key.partition(" ")
        if not method.isupper() or not path.startswith("/apis/"):
            continue
        parts = path.strip("/").split("/")  # apis, group, version[, plural, ...]
        out[f"{method} {parts[3] if len(parts) > 3 else 'namespaced'}"] += n
    return out


class Relay:
    def __init__(self, tmp: Path, name: str, kubeconfig: Path, args: argparse.Namespace) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.config = tmp / f"{name}.yaml"
        self.config.write_text(
            yaml.safe_dump(
                {
                    "listen": f"127.0.0.1:{self.port}",
                    "tls": {
                        "cert_file": str(tmp / "pki" / "relay.pem"),
                        "key_file": str(tmp / "pki" / "relay-key.pem"),
                        "ca_file": str(tmp / "pki" / "ca.pem"),
                    },
                    "kubeconfig": str(kubeconfig),
                    "minStatusInterval": f"{args.min_status_interval}s",
                    "apiQPS": args.api_qps,
                    "apiBurst": args.api_burst,
                    "name": name,
                    "metricsListen": f"127.0.0.1:{self.metrics_port}",
                    "log": {"level": "WARNING"},
                }
            )
        )
        self.log = (tmp / f"{name}.log").open("ab")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgetwin", "cloud", "run", "--config", str(self.config)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )

    async def ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                _, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.close()
                return
            await asyncio.sleep(0.1)
        raise SystemExit(f"relay did not listen on {self.port}")

    async def metrics(self) -> str:
        """A summary of the relay's /metrics: streams, status writes, API requests by
        verb and code, ended streams by reason ("" when it does not answer)."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        try:
            async with httpx.AsyncClient(timeout=10) as http:
                text = (await http.get(f"http://127.0.0.1:{self.metrics_port}/metrics")).text
        except httpx.HTTPError:
            return ""
        wanted = {
            "streams",
            "status_writes_total",
            "api_requests_total",
            "stream_ends_total",
            "api_throttled_seconds_total",
        }
        parts = []
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                short = sample.name.removeprefix("edgetwin_relay_")
                if short in wanted:
                    labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                    parts.append(
                        f"{short}{{{labels}}}={sample.value:.0f}" if labels else f"{short}={sample.value:.0f}"
                    )
        return " ".join(parts)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


class Workers:
    def __init__(self, procs: list[asyncio.subprocess.Process]) -> None:
        self.procs = procs
        self.totals: list[dict[str, int]] = [{} for _ in procs]
        self.dumps: list[asyncio.Future[dict[str, float]]] = []
        self._readers = [asyncio.create_task(self._read(i, p)) for i, p in enumerate(procs)]

    async def _read(self, i: int, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            msg = json.loads(line)
            if "dump" in msg:
                for fut in self.dumps:
                    if not fut.done():
                        fut.set_result(msg["dump"])
                        break
            else:
                self.totals[i] = msg

    def total(self, key: str) -> int:
        return sum(t.get(key, 0) for t in self.totals)

    async def send(self, command: str) -> None:
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write(command.encode() + b"\n")
            await p.stdin.drain()

    async def dump(self) -> dict[str, float]:
        loop = asyncio.get_running_loop()
        self.dumps = [loop.create_future() for _ in self.procs]
        await self.send("dump")
        out: dict[str, float] = {}
        for part in await asyncio.gather(*self.dumps):
            out.update(part)
        return out

    async def until(self, what: str, pred: Any, limit_s: float, relay: Relay | None = None) -> float:
        """Seconds until ``pred()``; every 30 s a progress line (the workers' totals and
        the relay's metrics); SystemExit after ``limit_s``."""
        started = time.monotonic()
        report = started + 30
        while not pred():
            now = time.monotonic()
            if now - started > limit_s:
                raise SystemExit(f"{what}: not within {limit_s:.0f} s ({await self.progress(relay)})")
            if now >= report:
                report = now + 30
                print(f"  ...{what} {now - started:.0f} s: {await self.progress(relay)}", flush=True)
            await asyncio.sleep(0.2)
        return time.monotonic() - started

    async def progress(self, relay: Relay | None) -> str:
        keys = ("connected", "connects", "outbox", "applied")
        totals = ", ".join(f"{k} {self.total(k)}" for k in keys)
        return totals + (f"; relay: {await relay.metrics()}" if relay is not None else "")

    async def all_reconnect(
        self, what: str, gateways: int, limit_s: float, relay: Relay | None = None
    ) -> float:
        """Seconds until every gateway has been welcomed once more from now."""
        connects0 = self.total("connects")
        return await self.until(
            what,
            lambda: self.total("connects") >= connects0 + gateways and self.total("connected") == gateways,
            limit_s,
            relay,
        )

    async def stop(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            await p.wait()
        for r in self._readers:
            r.cancel()


def max_per_second(times: list[float]) -> int:
    """The most requests that arrived within any one second."""
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] < t - 1.0:
            j += 1
        best = max(best, i - j + 1)
    return best


# --------------------------------------------------------------------- main
async def main(args: argparse.Namespace) -> None:
    phases = set(args.phases.split(","))
    if unknown := phases - {"steady", "storm", "failover"}:
        raise SystemExit(f"--phases: unknown {', '.join(sorted(unknown))} (steady, storm, failover)")
    tmp = Path(tempfile.mkdtemp(prefix="edgetwin-bench-fleet-"))
    nodes = [node_name(i) for i in range(args.gateways)]
    t0 = time.monotonic()
    await asyncio.to_thread(make_pki, tmp / "pki", nodes)
    print(f"pki for {len(nodes)} gateways in {time.monotonic() - t0:.1f} s", flush=True)
    n_devices = args.gateways * args.devices
    changes_per_s = n_devices / args.every
    kubeconfig_path = tmp / "kubeconfig"
    emulator = EmulatorProcess(kubeconfig_path, args.gateways, args.devices)
    relays: list[Relay] = []
    try:
        await emulator.start()
        balancer = Balancer()
        await balancer.start()
        relay_a = Relay(tmp, "relay-a", kubeconfig_path, args)
        relays.append(relay_a)
        relay_a.start()
        await relay_a.ready()
        balancer.backends.append(relay_a.port)
        await asyncio.sleep(3)
        idle_rss = rss_mb(relay_a.pid)
        print(f"relay idle: RSS {idle_rss:.1f} MB", flush=True)

        per = -(-len(nodes) // args.workers)
        procs = []
        for w in range(args.workers):
            spec = {
                "nodes": nodes[w * per : (w + 1) * per],
                "pki": str(tmp / "pki"),
                "address": f"127.0.0.1:{balancer.port}",
                "devices": args.devices,
                "every": args.every,
            }
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "scripts.bench.fleet",
                    "--worker",
                    json.dumps(spec),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    cwd=ROOT,
                    # A dump of 5,000 devices' last values is one line of ~150 KB (the
                    # default limit, 64 KiB, ended the reader and the failover waited forever).
                    limit=2**24,
                )
            )
        workers = Workers(procs)
        try:
            took = await workers.until(
                "connect", lambda: workers.total("connected") == len(nodes), 300, relay_a
            )
            print(f"connect: all {len(nodes)} gateways welcomed in {took:.1f} s", flush=True)
            await asyncio.sleep(args.warmup)
            settled = await connects_settled(emulator, len(nodes), 600)
            print(
                f"warm-up: every gateway's relists, watches and first list of its Devices done "
                f"{args.warmup + settled:.0f} s after the connect",
                flush=True,
            )
            if "steady" in phases:
                await steady(args, emulator, workers, relay_a, idle_rss, len(nodes), changes_per_s)
            if "storm" in phases:
                await storm(args, emulator, workers, relay_a, len(nodes))
            if "failover" in phases:
                relay_b = Relay(tmp, "relay-b", kubeconfig_path, args)
                relays.append(relay_b)
                await failover(args, workers, balancer, relay_a, relay_b, kubeconfig_path, len(nodes))
        finally:
            await workers.stop()
            await balancer.close()
    finally:
        for relay in relays:
            if relay.proc is not None and relay.proc.poll() is None:
                relay.kill()
        emulator.stop()


async def connects_settled(emulator: EmulatorProcess, gateways: int, limit_s: float) -> float:
    """Seconds until every gateway's connect is done: its relists, its watches started
    and the first list of its Devices for its status writes (at 1,000 gateways, at apiQPS
    100, they take longer than any fixed warm-up): 5 s without a list of Devices or
    DeviceModels, and as many DeviceModel watches started as gateways. So the steady
    window measures the steady state."""
    started = time.monotonic()
    last = -1
    while time.monotonic() - started < limit_s:
        verbs = (await emulator.ask("stats"))["verbs"]
        lists = verbs["GET devicemodels"] + verbs["GET devices"]
        if lists == last and verbs["WATCH devicemodels"] >= gateways:
            break
        last = lists
        await asyncio.sleep(5)
    return time.monotonic() - started


async def steady(
    args: argparse.Namespace,
    emulator: EmulatorProcess,
    workers: Workers,
    relay: Relay,
    idle_rss: float,
    gateways: int,
    changes_per_s: float,
) -> None:
    """Relay CPU and RSS per gateway, and the API requests, over --steady seconds."""
    before = await emulator.ask("stats")
    cpu0, at0 = proc_cpu_s(relay.pid), time.monotonic()
    applied0 = workers.total("applied")
    await asyncio.sleep(args.steady)
    dt = time.monotonic() - at0
    cores = (proc_cpu_s(relay.pid) - cpu0) / dt
    rss = rss_mb(relay.pid)
    after = await emulator.ask("stats")
    writes = (after["writes"] - before["writes"]) / dt
    requests = (after["requests"] - before["requests"]) / dt
    by_verb = after["verbs"] - before["verbs"]
    verb_rates = ", ".join(f"{verb} {n / dt:.0f}" for verb, n in sorted(by_verb.items()))
    messages = (workers.total("applied") - applied0) / dt
    per_gw_kb = (rss - idle_rss) * 1024 / gateways
    print(
        f"steady ({args.steady:.0f} s, {gateways} gateways x {args.devices} devices, "
        f"a change per device every {args.every:g} s = {changes_per_s:.0f} changes/s):\n"
        f"  relay CPU {cores:.2f} cores ({cores / gateways * 1e6:.0f} us/s per gateway); "
        f"RSS {rss:.1f} MB = {per_gw_kb:.0f} KB per gateway (goal <= 200)\n"
        f"  status messages applied {messages:.0f}/s; API requests {requests:.0f}/s ({verb_rates}), "
        f"status writes {writes:.0f}/s; baseline one write per change {changes_per_s:.0f}/s: "
        f"ratio {writes / changes_per_s:.2f}",
        flush=True,
    )


async def storm(
    args: argparse.Namespace, emulator: EmulatorProcess, workers: Workers, relay: Relay, gateways: int
) -> None:
    """The relay dies while devices change, then comes back."""
    await asyncio.sleep(1)
    relay.kill()
    await asyncio.sleep(args.outage)
    await workers.send("pause")  # the last change of the outage: drained below
    await emulator.ask("clear")
    relay.start()
    t_restart = time.monotonic()
    back = await workers.all_reconnect("reconnect", gateways, 600, relay)
    drained = await workers.until("drain", lambda: workers.total("outbox") == 0, 900, relay)
    converged = time.monotonic() - t_restart
    peak = max_per_second(sorted(await emulator.ask("times")))
    bound = args.api_qps + args.api_burst
    print(
        f"reconnect storm (relay killed for {args.outage:.0f} s while devices changed): "
        f"every gateway back in {back:.1f} s, every outbox empty {converged:.1f} s after the restart "
        f"({drained:.1f} s after the last reconnect); peak API requests in one second {peak} "
        f"(apiQPS {args.api_qps:g} + apiBurst {args.api_burst} = {bound:g}"
        f"{'' if args.api_qps else ': no limit'})",
        flush=True,
    )
    await workers.send("resume")


async def failover(
    args: argparse.Namespace,
    workers: Workers,
    balancer: Balancer,
    relay_a: Relay,
    relay_b: Relay,
    kubeconfig: Path,
    gateways: int,
) -> None:
    """A second replica behind the balancer, the first dies: every gateway moves, and the
    cloud holds every device's last value."""
    from lightkube import AsyncClient, KubeConfig

    from edgetwin.cloud.status_writer import Device

    relay_b.start()
    await relay_b.ready()
    balancer.backends.append(relay_b.port)
    await asyncio.sleep(args.warmup)
    await workers.send("pause")
    # Every gateway is on the first replica (the second joined after they connected).
    t_kill = time.monotonic()
    relay_a.kill()
    balancer.drop(relay_a.port)
    moved = await workers.all_reconnect("failover", gateways, 120, relay_b)
    await workers.until("drain", lambda: workers.total("outbox") == 0, 900, relay_b)
    emptied = time.monotonic() - t_kill
    last = await workers.dump()
    client = AsyncClient(config=KubeConfig.from_file(kubeconfig))
    missing = 0
    async for obj in client.list(Device, namespace=NAMESPACE):
        dev = f"{NAMESPACE}.{obj.metadata.name}"
        twins = {t.get("propertyName"): t for t in (obj.get("status") or {}).get("twins") or []}
        got = ((twins.get("temperature") or {}).get("reported") or {}).get("value")
        if dev in last and (got is None or float(got) != last[dev]):
            missing += 1
    await client.close()
    print(
        f"failover (2 replicas, one killed): every gateway on the other in {moved:.1f} s "
        f"(goal <= 30), every outbox empty in {emptied:.1f} s; devices whose last value the "
        f"cloud lacks: {missing} of {len(last)}",
        flush=True,
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gateways", type=int, default=1000)
    ap.add_argument("--devices", type=int, default=20, help="devices per gateway")
    ap.add_argument("--every", type=float, default=10.0, help="seconds between a device's changes")
    ap.add_argument("--workers", type=int, default=4, help="processes simulating gateways")
    ap.add_argument("--warmup", type=float, default=15.0)
    ap.add_argument("--steady", type=float, default=30.0)
    ap.add_argument("--outage", type=float, default=10.0, help="seconds the relay is down in the storm")
    ap.add_argument("--min-status-interval", type=float, default=5.0, help="the relay's, seconds")
    ap.add_argument("--api-qps", type=float, default=100.0)
    ap.add_argument("--api-burst", type=int, default=200)
    ap.add_argument(
        "--phases", default="steady,storm,failover", help="which phases run, comma-separated (default all)"
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(worker(json.loads(args.worker)))
    else:
        asyncio.run(main(args))
