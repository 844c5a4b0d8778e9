"""The ``edgetwin`` command.

Exit status: 0 success; 1 the operation failed (rejected value, no gateway answer,
runtime error); 2 bad configuration, manifest or arguments (one message naming what).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from edgetwin.deviceapi import ManifestError
from edgetwin.deviceapi.types import split_device_id
from edgetwin.gateway.config import ConfigError, GatewayConfig, load_config
from edgetwin.gateway.mapper_host import MapperLoadError
from edgetwin.gateway.mqtt.broker import BrokerStartError
from edgetwin.gateway.store.schema import SchemaTooNew
from edgetwin.gateway.store.store import StoreError
from edgetwin.runtime.version import __version__

EXIT_FAILED = 1
EXIT_USAGE = 2


class CliError(Exception):
    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


def _device_arg(text: str) -> str:
    namespace, sep, name = text.partition("/")
    if not sep:
        namespace, name = split_device_id(text) if "." in text else ("default", text)
    return f"{namespace}.{name}"


# --------------------------------------------------------------------- gateway run
def cmd_gateway_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    from edgetwin.runtime import logs

    logs.setup(args.log_level or cfg.log.level, cfg.log.format)
    return asyncio.run(_run_gateway(cfg))


# Once the gateway begins to stop, how long stopping may take (its own bounded steps, then
# the asyncio runner's: stray tasks, worker threads) before the process ends anyway. A
# supervisor (systemd's Restart=, a container runtime) restarts only a process that ended.
# $EDGETWIN_STOP_DEADLINE_S overrides it (seconds).
STOP_DEADLINE_S = 40.0


def _exit_anyway_after(seconds: float, status: int) -> None:
    """End the process with ``status`` in ``seconds`` unless it has ended by then."""

    def hard_exit() -> None:
        print(f"edgetwin: stopping took more than {seconds:.0f} s; exiting anyway", file=sys.stderr)
        sys.stderr.flush()
        os._exit(status)

    timer = threading.Timer(seconds, hard_exit)
    timer.daemon = True
    timer.start()


async def _run_gateway(cfg: GatewayConfig) -> int:
    from edgetwin.gateway.service import Gateway

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
    _exit_anyway_after(deadline, 0 if stop.is_set() else EXIT_FAILED)
    await running
    return 0


# --------------------------------------------------------------------- twin get / list
def cmd_twin_get(args: argparse.Namespace) -> int:
    from edgetwin.gateway.store.store import open_reader, read_twin

    cfg = load_config(args.config)
    dev_id = _device_arg(args.device)
    db = open_reader(cfg.store.path)
    twin = read_twin(db, dev_id)
    if twin is None:
        raise CliError(f"no twin for device {args.device} in {cfg.store.path}")
    if args.json:
        print(json.dumps(twin, indent=2))
        return 0
    print(f"device {dev_id}  state {twin['state']}")
    rows = [("PROPERTY", "REPORTED", "VERSION", "AGE", "DESIRED", "ORIGIN", "WRITE", "READ ERROR")]
    now = time.time() * 1000
    for name, entry in twin["twin"].items():
        rep, des = entry.get("reported"), entry.get("desired")
        rows.append(
            (
                name,
                _text(rep["value"]) if rep else "-",
                str(rep["version"]) if rep else "-",
                f"{max(0.0, (now - rep['timestamp']) / 1000):.1f}s" if rep else "-",
                _text(des["value"]) if des else "-",
                des["origin"] if des else "-",
                (des["writeState"] + (f" ({des['writeReason']})" if des["writeReason"] else ""))
                if des
                else "-",
                entry.get("readError", "-"),
            )
        )
    _print_table(rows)
    return 0


def cmd_twin_events(args: argparse.Namespace) -> int:
    from edgetwin.gateway.store.store import open_reader, read_events

    cfg = load_config(args.config)
    dev_id = _device_arg(args.device) if args.device else None
    events = read_events(open_reader(cfg.store.path), dev_id, args.kind, args.limit)
    if args.json:
        print(json.dumps(events, indent=2))
        return 0
    rows = [("TIME", "DEVICE", "PROPERTY", "KIND", "DETAIL")]
    for ev in events:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ev["ts_ms"] / 1000))
        detail = ev["detail"].get("message") or ev["detail"].get("reason") or json.dumps(ev["detail"])
        rows.append((when, ev["device"], ev["property"] or "-", ev["kind"], str(detail)))
    _print_table(rows)
    return 0


def cmd_twin_list(args: argparse.Namespace) -> int:
    from edgetwin.gateway.store.store import list_devices, open_reader

    cfg = load_config(args.config)
    devices = list_devices(open_reader(cfg.store.path))
    if args.json:
        print(json.dumps(devices, indent=2))
        return 0
    rows = [("DEVICE", "SOURCE", "READY", "STATE", "PROPERTIES", "OUTBOX", "REASON")]
    for d in devices:
        ready = {True: "True", False: "False", None: "-"}[d["ready"]]
        rows.append(
            (
                d["device"],
                d["source"],
                ready,
                d["state"],
                str(d["properties"]),
                "pending" if d["outbox"] else "-",
                d["reason"] if d["ready"] is False else "",
            )
        )
    _print_table(rows)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """The gateway's health in one screen: from its health endpoint (when
    ``health.listen`` is set) and its store (always; read-only, safe while it runs)."""
    from edgetwin.gateway.store.store import gateway_summary, open_reader

    cfg = load_config(args.config)
    summary = gateway_summary(open_reader(cfg.store.path), now_ms=int(time.time() * 1000))
    health, metrics = _scrape(cfg.health.listen)
    if args.json:
        print(json.dumps({"node": cfg.node, **summary, "health": health, "metrics": metrics}, indent=2))
        return 0 if health.get("status") in ("ok", None) else 1
    lines = [f"edgetwin {__version__}, node {cfg.node}, store {cfg.store.path}"]
    if cfg.health.listen is None:
        lines.append("health   unknown (set health.listen to let the running gateway answer)")
    elif "error" in health:
        lines.append(f"health   NOT ANSWERING at {cfg.health.listen}: {health['error']}")
    else:
        problems = health.get("problems") or []
        lines.append("health   ok" if not problems else "health   FAILING: " + "; ".join(problems))
    d = summary["devices"]
    lines.append(
        f"devices  {d['served']} served, {d['online']} online, {d['offline']} offline, "
        f"{d['not_ready']} not ready"
    )
    for name, reason in d["not_ready_examples"]:
        lines.append(f"         {name}: {reason}"[:200])
    o = summary["outbox"]
    age = f", oldest {o['oldest_age_s']:.0f} s" if o["oldest_age_s"] is not None else ""
    lines.append(f"outbox   {o['devices']} devices waiting for the cloud{age}")
    if cfg.uplink is None:
        lines.append("link     no uplink configured")
    elif metrics:
        up = "connected" if metrics.get("edgetwin_gateway_uplink_connected") == 1 else "DISCONNECTED"
        last = metrics.get("edgetwin_gateway_uplink_last_receive_age_seconds")
        seen = f", relay heard {last:.0f} s ago" if isinstance(last, float) and last == last else ""
        lines.append(
            f"link     {up} to {cfg.uplink.address}{seen}, "
            f"{int(metrics.get('edgetwin_gateway_uplink_connects_total', 0))} connects, "
            f"{int(metrics.get('edgetwin_gateway_uplink_payload_bytes_total', 0))} payload bytes"
        )
    else:
        lines.append(f"link     to {cfg.uplink.address}; state unknown without health.listen")
    if metrics:
        mqtt = "connected" if metrics.get("edgetwin_gateway_mqtt_connected") == 1 else "DISCONNECTED"
        lines.append(f"mqtt     {mqtt} to {cfg.mqtt.url or 'the embedded broker'}")
    e = summary["events_last_hour"]
    lines.append("errors   last hour: " + (", ".join(f"{n} {k}" for k, n in sorted(e.items())) or "none"))
    for text in lines:
        print(text)
    return 0 if not health.get("problems") and "error" not in health else 1


def _scrape(listen: str | None) -> tuple[dict[str, Any], dict[str, float]]:
    """The running gateway's /healthz and /metrics (sums per metric name)."""
    if listen is None:
        return {}, {}
    import httpx

    host, _, port = listen.rpartition(":")
    host = "127.0.0.1" if host in ("0.0.0.0", "[::]", "::") else host.strip("[]")
    try:
        with httpx.Client(base_url=f"http://{host}:{port}", timeout=3) as web:
            health = web.get("/healthz").json()
            text = web.get("/metrics").text
    except (httpx.HTTPError, ValueError) as exc:
        return {"error": str(exc) or type(exc).__name__}, {}
    from prometheus_client.parser import text_string_to_metric_families

    metrics: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                metrics[sample.name] = metrics.get(sample.name, 0.0) + sample.value
    except ValueError:  # not the Prometheus text format: health only
        return health, {}
    return health, metrics


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _print_table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


# --------------------------------------------------------------------- twin set
def cmd_twin_set(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    dev_id = _device_arg(args.device)
    values: dict[str, str] = {}
    for item in args.assignments:
        prop, sep, value = item.partition("=")
        if not sep or not prop:
            raise CliError(f"expected PROP=VALUE, got {item!r}", EXIT_USAGE)
        values[prop] = value
    return asyncio.run(_twin_set(cfg, dev_id, values, args.timeout))


async def _twin_set(cfg: GatewayConfig, dev_id: str, values: dict[str, str], wait_s: float) -> int:
    import aiomqtt

    from edgetwin.gateway.mqtt import payloads, topics

    host, port = cfg.mqtt.host_port
    event_id = payloads.new_event_id()
    request = payloads.twin_set_request(event_id, int(time.time() * 1000), values)
    # The gateway's TLS rules (gateway.mqtt.bus): mqtts:// or a tls block means TLS; no CA
    # file means the system's CAs; insecure skips the host name check.
    tls, t = None, cfg.mqtt.tls
    if cfg.mqtt.use_tls:
        tls = aiomqtt.TLSParameters(
            ca_certs=str(t.ca_file) if t and t.ca_file else None,
            certfile=str(t.cert_file) if t and t.cert_file else None,
            keyfile=str(t.key_file) if t and t.key_file else None,
        )
    try:
        async with aiomqtt.Client(
            host,
            port,
            username=cfg.mqtt.username,
            password=cfg.mqtt.password,
            tls_params=tls,
            tls_insecure=bool(t and t.insecure) if tls else None,
            timeout=wait_s,
        ) as client:
            await client.subscribe(topics.twin_update_result(dev_id), qos=1)
            await client.publish(topics.twin_update(dev_id), request, qos=1)
            async with asyncio.timeout(wait_s):
                async for message in client.messages:
                    doc = json.loads(bytes(message.payload))  # type: ignore[arg-type,unused-ignore]
                    if doc.get("event_id") == event_id:
                        return _report_set(dev_id, doc)
    except TimeoutError:
        raise CliError(
            f"the gateway did not answer within {wait_s:g}s; the request is at the broker "
            "and is applied when the gateway takes it (is the gateway running?)"
        ) from None
    except aiomqtt.MqttError as exc:
        raise CliError(f"cannot reach the MQTT broker at {host}:{port}: {exc}") from None
    return EXIT_FAILED


def _report_set(dev_id: str, doc: dict[str, Any]) -> int:
    if "reason" in doc:
        raise CliError(f"rejected: {doc['reason']}")
    status = 0
    for prop, reason in doc.get("rejected", {}).items():
        print(f"{dev_id} {prop}: rejected: {reason}", file=sys.stderr)
        status = EXIT_FAILED
    for prop, entry in doc.get("twin", {}).items():
        expected = entry.get("expected")
        if expected is None:
            continue
        meta = expected["metadata"]
        verdict = "set" if meta.get("accepted") else "kept the newer value in effect"
        print(
            f"{dev_id} {prop}: desired {expected['value']} "
            f"({verdict}; origin {meta['origin']}, stamp {meta['stamp']})"
        )
    return status


# --------------------------------------------------------------------- config check
def cmd_config_check(args: argparse.Namespace) -> int:
    from edgetwin.gateway.manifests import load_manifests
    from edgetwin.gateway.mapper_host import validate_devices

    cfg = load_config(args.config)
    manifests = load_manifests(cfg.manifests, cfg.node)
    try:
        missing = validate_devices([(d, manifests.model_for(d)) for d in manifests.devices.values()])
    except MapperLoadError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    print(
        f"config ok: node {cfg.node}, {len(manifests.models)} models, "
        f"{len(manifests.devices)} devices for this node, {len(manifests.foreign)} for other nodes"
    )
    if missing:
        print(
            f"note: no mapper installed for {', '.join(missing)}; those devices are left to external mappers"
        )
    return 0


# --------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from edgetwin.simulators.demo import run_demo

    _run_until_signalled(
        run_demo(
            duration=args.duration,
            live=not args.no_live,
            cloud=args.cloud,
            workdir=Path(args.workdir) if args.workdir else None,
            mqtt_port=args.mqtt_port,
        )
    )
    return 0


def _run_until_signalled(main: Coroutine[Any, Any, Any]) -> None:
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


# --------------------------------------------------------------------- simulators
def _serve_until_interrupted(main: Coroutine[Any, Any, None], host: str, port: int) -> int:
    """Run a server until SIGINT or SIGTERM; a port that cannot be bound is a clear error."""
    try:
        _run_until_signalled(main)
    except OSError as exc:
        raise CliError(f"cannot serve on {host}:{port}: {exc}") from None
    return 0


def cmd_sim_modbus(args: argparse.Namespace) -> int:
    from edgetwin.simulators.modbus import serve

    return _serve_until_interrupted(serve(args.host, args.port, args.unit), args.host, args.port)


def cmd_sim_ble(args: argparse.Namespace) -> int:
    from edgetwin.simulators.ble import serve

    return _serve_until_interrupted(
        serve(args.host, args.port, args.count, args.beacons, args.prefix, args.notify_interval),
        args.host,
        args.port,
    )


def cmd_cloud_run(args: argparse.Namespace) -> int:
    from edgetwin.cloud import ops
    from edgetwin.cloud.api_rate import ApiRateLimit
    from edgetwin.cloud.config import RelayConfigError, kube_config, load_relay_config
    from edgetwin.cloud.gateway_status import GatewayTiming
    from edgetwin.cloud.relay import RelaySettings, serve
    from edgetwin.runtime.aio import cancel_tasks
    from edgetwin.runtime.ops_http import OpsServer, split_listen

    try:
        cfg = load_relay_config(args.config)
        kube = kube_config(cfg, str(args.config))
    except RelayConfigError as exc:
        print(f"edgetwin: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from edgetwin.runtime import logs

    logs.setup(args.log_level or cfg.log.level, cfg.log.format)  # the gateway's structured lines

    async def run() -> None:
        client = ops.api_client(kube, "edgetwin-relay")
        watch_client = ops.api_client(kube, "edgetwin-relay", watches=True)
        gateway = cfg.gatewayStatus
        settings = RelaySettings(
            min_status_interval_s=cfg.minStatusInterval / 1000,
            node_selector=cfg.nodeSelector,
            dead_after_s=cfg.linkDeadAfter / 1000,
            name=cfg.name or "",
            gateway=GatewayTiming(
                interval_s=gateway.interval / 1000,
                heartbeat_s=gateway.heartbeat / 1000,
                stale_after_s=gateway.staleAfter / 1000,
            ),
        )
        limit = ApiRateLimit(cfg.apiQPS, cfg.apiBurst)  # one rate for both clients
        ops.instrument(client, limit)
        ops.instrument(watch_client, limit)
        # The probe asks whether the API server answers, not whether the bucket has a
        # token: behind a reconnect storm's queue it would time out and take a busy but
        # healthy replica out of its Service. One request per interval, unthrottled.
        probe_client = ops.api_client(kube, "edgetwin-relay", connections=1)
        ops.instrument(probe_client)
        health = await ops.new_health()
        probe = ops.ApiProbe(probe_client, health, cfg.apiProbeInterval / 1000)
        probe_task = asyncio.create_task(probe.run(), name="api probe")
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(client.close)
            stack.push_async_callback(watch_client.close)
            stack.push_async_callback(probe_client.close)
            stack.push_async_callback(cancel_tasks, [probe_task])
            try:
                server, _, port = await serve(
                    client,
                    cfg.listen,
                    cfg.tls.cert_file.read_bytes(),
                    cfg.tls.key_file.read_bytes(),
                    cfg.tls.ca_file.read_bytes(),
                    settings,
                    health,
                    watch_client,
                )
            except RuntimeError as exc:  # grpc: "Failed to bind to address ..."
                raise CliError(f"listen: cannot serve on {cfg.listen}: {exc}", EXIT_USAGE) from None
            stack.push_async_callback(server.stop, 5)
            lines = [f"edgetwin relay listening on {cfg.listen.rsplit(':', 1)[0]}:{port} (mutual TLS)"]
            if cfg.healthListen:
                try:
                    hserver, hport = await ops.health_server(health, cfg.healthListen)
                except RuntimeError as exc:
                    raise CliError(
                        f"healthListen: cannot serve on {cfg.healthListen}: {exc}", EXIT_USAGE
                    ) from None
                stack.push_async_callback(hserver.stop, 1)
                lines.append(f"grpc health on {cfg.healthListen.rsplit(':', 1)[0]}:{hport}")
            if cfg.metricsListen:
                web = OpsServer(probe.problems)
                try:
                    mport = await web.start(*split_listen(cfg.metricsListen))
                except OSError as exc:
                    raise CliError(
                        f"metricsListen: cannot serve on {cfg.metricsListen}: {exc}", EXIT_USAGE
                    ) from None
                stack.push_async_callback(web.stop)
                lines.append(f"metrics on http://{cfg.metricsListen.rsplit(':', 1)[0]}:{mport}/metrics")
            print("; ".join(lines), flush=True)
            await server.wait_for_termination()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


def cmd_cloud_crds(args: argparse.Namespace) -> int:
    from edgetwin.deploy import crds_yaml

    sys.stdout.write(crds_yaml())
    return 0


def cmd_kube_emulator(args: argparse.Namespace) -> int:
    from edgetwin.deploy import CRDS
    from edgetwin.simulators.kube.emulator import BANNER, Emulator, RunningEmulator

    where = Path(args.crds) if args.crds else CRDS
    crds = sorted(where.glob("*.yaml")) if where.is_dir() else [where]
    if not crds or not all(p.is_file() for p in crds):
        raise CliError(f"no CRD files at {where} (give --crds with a CRD file or folder)")
    emulator = Emulator.from_files(crds)
    if not emulator.resources:
        raise CliError(f"{where} holds no CustomResourceDefinition")

    async def serve() -> None:
        async with RunningEmulator(emulator, args.host, args.port) as running:
            if args.kubeconfig:
                running.kubeconfig(Path(args.kubeconfig), args.namespace)
            print(
                f"{BANNER}\nserving {running.url}"
                + (f", kubeconfig {args.kubeconfig}" if args.kubeconfig else "")
            )
            await asyncio.Event().wait()

    return _serve_until_interrupted(serve(), args.host, args.port)


# --------------------------------------------------------------------- parser
DEFAULT_GATEWAY_CONFIG = Path("/etc/edgetwin/gateway.yaml")
DEFAULT_RELAY_CONFIG = Path("/etc/edgetwin/relay.yaml")


def _default_config(env: str, default: Path) -> Path:
    """``--config`` may be left out: the environment variable, else the system path."""
    value = os.environ.get(env)
    return Path(value) if value else default


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgetwin", description="Offline-tolerant sync gateway with device twins"
    )
    parser.add_argument("--version", action="version", version=f"edgetwin {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    gateway_config = _default_config("EDGETWIN_CONFIG", DEFAULT_GATEWAY_CONFIG)
    config_help = f"the gateway's config (default: $EDGETWIN_CONFIG or {DEFAULT_GATEWAY_CONFIG})"

    gw = sub.add_parser("gateway", help="the edge gateway service").add_subparsers(
        dest="action", required=True
    )
    run = gw.add_parser("run", help="run the gateway")
    run.add_argument("--config", type=Path, default=gateway_config, help=config_help)
    run.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    run.set_defaults(func=cmd_gateway_run)

    twin = sub.add_parser("twin", help="read and set device twins").add_subparsers(
        dest="action", required=True
    )
    get = twin.add_parser("get", help="show a device's twin (works while the gateway runs)")
    get.add_argument("device", help="NAMESPACE/NAME")
    get.add_argument("--json", action="store_true")
    get.add_argument("--config", type=Path, default=gateway_config, help=config_help)
    get.set_defaults(func=cmd_twin_get)
    lst = twin.add_parser("list", help="list devices: source, readiness, state, pending status")
    lst.add_argument("--json", action="store_true")
    lst.add_argument("--config", type=Path, default=gateway_config, help=config_help)
    lst.set_defaults(func=cmd_twin_list)
    events = twin.add_parser("events", help="the local event log: conflicts, rejected values, failed writes")
    events.add_argument("device", nargs="?", help="NAMESPACE/NAME (all devices if omitted)")
    events.add_argument("--kind", choices=["conflict", "rejected", "write_failed", "read_error", "state"])
    events.add_argument("--limit", type=int, default=50, help="newest N events (default 50)")
    events.add_argument("--json", action="store_true")
    events.add_argument("--config", type=Path, default=gateway_config, help=config_help)
    events.set_defaults(func=cmd_twin_events)
    set_ = twin.add_parser("set", help="set edge-local desired values, applied by the running gateway")
    set_.add_argument("device", help="NAMESPACE/NAME")
    set_.add_argument("assignments", nargs="+", metavar="PROP=VALUE")
    set_.add_argument("--config", type=Path, default=gateway_config, help=config_help)
    set_.add_argument("--timeout", type=float, default=10.0)
    set_.set_defaults(func=cmd_twin_set)

    status = sub.add_parser(
        "status", help="the gateway's health in one screen: link, outbox, devices, errors"
    )
    status.add_argument("--json", action="store_true")
    status.add_argument("--config", type=Path, default=gateway_config, help=config_help)
    status.set_defaults(func=cmd_status)

    cfg = sub.add_parser("config", help="configuration").add_subparsers(dest="action", required=True)
    check = cfg.add_parser("check", help="validate a config and its manifests")
    check.add_argument("--config", type=Path, default=gateway_config, help=config_help)
    check.set_defaults(func=cmd_config_check)

    sim = sub.add_parser("sim", help="device simulators").add_subparsers(dest="kind", required=True)
    modbus = sim.add_parser("modbus", help="a Modbus TCP boiler controller whose values move")
    modbus.add_argument("--host", default="127.0.0.1")
    modbus.add_argument("--port", type=int, default=5020)
    modbus.add_argument("--unit", type=int, default=1)
    modbus.set_defaults(func=cmd_sim_modbus)
    ble = sim.add_parser(
        "ble",
        help="emulated BLE sensors (Bumble) on a virtual radio; centrals attach over HCI on TCP",
        description="Connect with mappers: {ble: {hci: tcp-client:HOST:PORT}}. Control lines on stdin: "
        "drop NAME | silence NAME SECONDS | state NAME | quit.",
    )
    ble.add_argument("--host", default="127.0.0.1")
    ble.add_argument("--port", type=int, default=9000, help="HCI over TCP port for centrals")
    ble.add_argument("--count", type=int, default=1, help="environmental sensors env-sensor-1..N")
    ble.add_argument("--beacons", type=int, default=0, help="advertisement-only beacons beacon-1..N")
    ble.add_argument("--prefix", default="env-sensor", help="sensor name prefix")
    ble.add_argument(
        "--notify-interval", type=float, default=1.0, help="seconds between value changes and notifications"
    )
    ble.set_defaults(func=cmd_sim_ble)

    cloud = sub.add_parser("cloud", help="cloud side").add_subparsers(dest="action", required=True)
    crun = cloud.add_parser("run", help="run the cloud relay (gRPC, mutual TLS) against a Kubernetes API")
    crun.add_argument(
        "--config",
        type=Path,
        default=_default_config("EDGETWIN_RELAY_CONFIG", DEFAULT_RELAY_CONFIG),
        help=f"default: ${{EDGETWIN_RELAY_CONFIG}} or {DEFAULT_RELAY_CONFIG}",
    )
    crun.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    crun.set_defaults(func=cmd_cloud_run)
    crds = cloud.add_parser(
        "crds",
        help="print the CustomResourceDefinitions edgetwin needs (edgetwin cloud crds | kubectl apply -f -)",
    )
    crds.set_defaults(func=cmd_cloud_crds)
    emu = cloud.add_parser(
        "kube-emulator",
        help="a Kubernetes API emulator for the edgetwin CRDs (development stand-in, not for production)",
    )
    emu.add_argument("--host", default="127.0.0.1")
    emu.add_argument("--port", type=int, default=8001)
    emu.add_argument("--crds", help="CRD file or folder (default: the CRDs edgetwin ships)")
    emu.add_argument("--kubeconfig", help="write a kubeconfig for kubectl here")
    emu.add_argument("--namespace", default="default", help="the kubeconfig's namespace")
    emu.set_defaults(func=cmd_kube_emulator)

    demo = sub.add_parser("demo", help="run a self-contained demo with simulated devices")
    demo.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    demo.add_argument("--no-live", action="store_true", help="print snapshots instead of a live view")
    demo.add_argument(
        "--cloud",
        action="store_true",
        help="also run the relay against a Kubernetes API emulator (a development stand-in), for kubectl",
    )
    demo.add_argument(
        "--workdir", help="keep the store, PKI and kubeconfig here (default: a new temporary folder)"
    )
    demo.add_argument(
        "--mqtt-port", type=int, default=0, help="the embedded broker's port (default: a free one)"
    )
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except (ConfigError, ManifestError) as exc:
        print(f"edgetwin: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CliError as exc:
        print(f"edgetwin: {exc}", file=sys.stderr)
        return exc.status
    except ValueError as exc:  # a bad argument, e.g. a device id
        print(f"edgetwin: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (StoreError, SchemaTooNew, MapperLoadError, BrokerStartError) as exc:
        print(f"edgetwin: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    return status


if __name__ == "__main__":
    sys.exit(main())
