"""``edgetwin twin get | list | events | set``: read a twin, the devices and the event
log from the store (read-only, safe while the gateway runs), and set edge-local desired
values through the running gateway's MQTT topics."""

from __future__ import annotations

import argparse
import asyncio
import difflib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import aiomqtt

from edgetwin.cli.common import EXIT_FAILED, EXIT_USAGE, CliError, device_arg, print_table, text
from edgetwin.deviceapi.values import ValueRejected, desired_value
from edgetwin.gateway.config import GatewayConfig, load_config
from edgetwin.gateway.mqtt import payloads, topics
from edgetwin.gateway.store.reader import (
    device_ids,
    list_devices,
    open_reader,
    read_events,
    read_model_properties,
    read_twin,
)

log = logging.getLogger(__name__)


def _shown(dev_id: str) -> str:
    """A device id as the CLI takes it: ``plant.boiler-1`` -> ``plant/boiler-1``."""
    return dev_id.replace(".", "/", 1)


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def resolve_device(db: Any, given: str, store: Path) -> str:
    """The device id for ``NAMESPACE/NAME``. A bare name is refused with the devices of
    that name; an unknown device with the closest known ones."""
    known = device_ids(db)
    if "/" not in given and "." not in given:
        same_name = [_shown(d) for d in known if d.partition(".")[2] == given]
        hint = (
            f"; did you mean {' or '.join(same_name)}?"
            if same_name
            else _did_you_mean(given, [_shown(d) for d in known])
        )
        raise CliError(f"give the device as NAMESPACE/NAME, not {given!r}{hint}", EXIT_USAGE)
    dev_id = device_arg(given)
    if dev_id not in known:
        hint = _did_you_mean(_shown(dev_id), [_shown(d) for d in known])
        raise CliError(f"no device {_shown(dev_id)} in the store {store}{hint}", EXIT_USAGE)
    return dev_id


def check_assignments(props: dict[str, dict[str, Any]], dev_id: str, values: dict[str, str]) -> list[str]:
    """What the gateway would refuse in ``values``, checked against the device's model
    as last served (type, range, ReadOnly, unknown names), one line per problem."""
    errors = []
    for name, given in values.items():
        spec = props.get(name)
        if spec is None:
            hint = _did_you_mean(name, list(props))
            errors.append(f"{_shown(dev_id)} {name}: not a property of its DeviceModel{hint}")
            continue
        low, high = spec.get("minimum"), spec.get("maximum")
        writable = spec.get("accessMode", "ReadOnly") == "ReadWrite"
        try:
            desired_value(
                given,
                str(spec.get("type")),
                writable,
                float(low) if low is not None else None,
                float(high) if high is not None else None,
            )
        except ValueRejected as exc:
            what = (
                f"{name}={given}: {exc.reason} ({spec.get('type')})" if writable else f"{name}: {exc.reason}"
            )
            errors.append(f"{_shown(dev_id)} {what}")
    return errors


def get(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    db = open_reader(cfg.store.path)
    dev_id = resolve_device(db, args.device, cfg.store.path)
    twin = read_twin(db, dev_id)
    if twin is None:
        raise CliError(f"no twin for device {args.device} in {cfg.store.path}")
    if args.json:
        print(json.dumps(twin, indent=2))
        return 0
    print(f"device {dev_id}  state {twin['state']}")
    rows = [("PROPERTY", "REPORTED", "VERSION", "AGE", "DESIRED", "ORIGIN", "WRITE", "LAST ERROR")]
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
    db = open_reader(cfg.store.path)
    dev_id = resolve_device(db, args.device, cfg.store.path) if args.device else None
    found = read_events(db, dev_id, args.kind, args.limit)
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    rows = [("TIME", "DEVICE", "PROPERTY", "KIND", "DETAIL")]
    for ev in found:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ev["ts_ms"] / 1000))
        d = ev["detail"]
        detail = str(d.get("message") or d.get("reason") or json.dumps(d))
        if "desired" in d:
            detail = f"desired {d['desired']} from {d.get('origin', '?')}: {detail}"
        if d.get("suppressed"):
            detail += f" (and {d['suppressed']} more like it)"
        # Names outside the model are listed in the event, not as its property.
        prop = ev["property"] or ",".join(d.get("names") or []) or "-"
        rows.append((when, _shown(ev["device"]), prop, ev["kind"], detail))
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
    values: dict[str, str] = {}
    for item in args.assignments:
        prop, sep, value = item.partition("=")
        if not sep or not prop:
            raise CliError(f"expected PROP=VALUE, got {item!r}", EXIT_USAGE)
        values[prop] = value
    # Checked against the store before anything is sent, so a value the gateway would
    # refuse is refused here too, with the gateway running or not.
    if Path(cfg.store.path).exists():
        db = open_reader(cfg.store.path)
        dev_id = resolve_device(db, args.device, cfg.store.path)
        props = read_model_properties(db, dev_id)
        errors = check_assignments(props, dev_id, values) if props is not None else []
        if errors:
            raise CliError("refused, nothing was sent:\n  " + "\n  ".join(errors))
    else:
        dev_id = device_arg(args.device)
        print(
            f"edgetwin: no store at {cfg.store.path} yet: not checked here, the gateway checks",
            file=sys.stderr,
        )
    return asyncio.run(_twin_set(cfg, dev_id, values, args.timeout))


def quiet_socket_races(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The event loop's exception handler for ``twin set``. aiomqtt registers paho's
    socket with the loop from a callback it schedules; when the connection fails first (a
    broker refusing the TLS handshake) the callback finds the socket closed, and asyncio
    would print its traceback. The failure itself is reported, in one line, by the
    awaited connect; every other error goes to asyncio's own handler."""
    handle, exc = context.get("handle"), context.get("exception")
    registering = handle is not None and ("add_writer" in repr(handle) or "add_reader" in repr(handle))
    if registering and isinstance(exc, OSError | ValueError | KeyError):
        log.debug("a closed socket's registration with the event loop failed", exc_info=exc)
        return
    loop.default_exception_handler(context)


async def _twin_set(cfg: GatewayConfig, dev_id: str, values: dict[str, str], wait_s: float) -> int:
    asyncio.get_running_loop().set_exception_handler(quiet_socket_races)
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
