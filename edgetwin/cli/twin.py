"""``edgetwin twin get | list | events | set``: read a twin, the devices and the event
log from the store (read-only, safe while the gateway runs), and set edge-local desired
values through the running gateway's MQTT topics."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import aiomqtt

from edgetwin.cli.common import EXIT_FAILED, EXIT_USAGE, CliError, device_arg, print_table, text
from edgetwin.gateway.config import GatewayConfig, load_config
from edgetwin.gateway.mqtt import payloads, topics
from edgetwin.gateway.store.reader import list_devices, open_reader, read_events, read_twin


def get(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    dev_id = device_arg(args.device)
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
                text(rep["value"]) if rep else "-",
                str(rep["version"]) if rep else "-",
                f"{max(0.0, (now - rep['timestamp']) / 1000):.1f}s" if rep else "-",
                text(des["value"]) if des else "-",
                des["origin"] if des else "-",
                (des["writeState"] + (f" ({des['writeReason']})" if des["writeReason"] else ""))
                if des
                else "-",
                entry.get("readError", "-"),
            )
        )
    print_table(rows)
    return 0


def events(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    dev_id = device_arg(args.device) if args.device else None
    found = read_events(open_reader(cfg.store.path), dev_id, args.kind, args.limit)
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    rows = [("TIME", "DEVICE", "PROPERTY", "KIND", "DETAIL")]
    for ev in found:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ev["ts_ms"] / 1000))
        detail = ev["detail"].get("message") or ev["detail"].get("reason") or json.dumps(ev["detail"])
        rows.append((when, ev["device"], ev["property"] or "-", ev["kind"], str(detail)))
    print_table(rows)
    return 0


def list_(args: argparse.Namespace) -> int:
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
    print_table(rows)
    return 0


def set_(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    dev_id = device_arg(args.device)
    values: dict[str, str] = {}
    for item in args.assignments:
        prop, sep, value = item.partition("=")
        if not sep or not prop:
            raise CliError(f"expected PROP=VALUE, got {item!r}", EXIT_USAGE)
        values[prop] = value
    return asyncio.run(_twin_set(cfg, dev_id, values, args.timeout))


async def _twin_set(cfg: GatewayConfig, dev_id: str, values: dict[str, str], wait_s: float) -> int:
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
