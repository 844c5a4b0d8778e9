"""The mosquitto settings docs/mqtt.md recommends, pasted as written into a fresh
mosquitto 2.x: the gateway is accepted, and a gateway outage under a steady stream of
updates loses nothing. And where a broker does drop what it acknowledged, the gateway
reports it (metric and warning) instead of hiding it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import Collector, GatewayProcess, device_doc, model_doc, write_manifests
from tests.harness.processes import Mosquitto, free_port, mosquitto_binary, wait_port

ROOT = Path(__file__).resolve().parents[3]
NODE = "edge-broker"
DEVICES = [f"s{i}" for i in range(20)]


def documented_mosquitto_conf() -> str:
    """The config block under "Broker settings (mosquitto)" in docs/mqtt.md."""
    text = (ROOT / "docs" / "mqtt.md").read_text()
    section = text[text.index("## Broker settings (mosquitto)") :]
    match = re.search(r"```\n(.*?)```", section, re.S)
    assert match, "no config block in the Broker settings section"
    return match.group(1)


def localise(conf: str, port: int, tmp: Path) -> str:
    """Only the host-specific paths and the port change; everything else is as written."""
    for old, new in (
        ("listener 1883 127.0.0.1", f"listener {port} 127.0.0.1"),
        ("/etc/mosquitto/passwd", str(tmp / "passwd")),
        ("/var/lib/mosquitto/", f"{tmp / 'data'}/"),
    ):
        assert old in conf, f"docs/mqtt.md's broker settings no longer contain {old!r}"
        conf = conf.replace(old, new)
    # $SYS counters refreshed each second rather than each 10 s (mosquitto's default, not
    # a setting of the docs): the test reads the dropped count without waiting for time.
    return conf + f"log_dest file {tmp / 'mosquitto.log'}\nsys_interval 1\n"


def publish_at_rate(port: int, auth: tuple[str, str], total: int, rate: float) -> int:
    """QoS 1 updates at ``rate``/s; returns how many the broker acknowledged."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="outage-publisher")
    client.username_pw_set(*auth)
    client.max_inflight_messages_set(200)
    client.connect("127.0.0.1", port)
    client.loop_start()
    infos = []
    started = time.monotonic()
    for i in range(total):
        dev = DEVICES[i % len(DEVICES)]
        body = json.dumps({"event_id": f"o{i}", "twin": {"count": {"actual": {"value": i}}}})
        infos.append(client.publish(f"$hw/events/device/plant.{dev}/twin/update", body, qos=1))
        delay = started + (i + 1) / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    for info in infos:
        info.wait_for_publish(30)
    client.loop_stop()
    client.disconnect()
    return sum(1 for info in infos if info.is_published())


def broker_dropped(port: int, auth: tuple[str, str] | None) -> int:
    sys_topic = Collector(port, ["$SYS/broker/publish/messages/dropped"], auth=auth)
    try:
        _, payload = sys_topic.wait_for(lambda t, p: True, 30)  # sys_interval 1 s; a busy broker lags
        return int(payload)
    finally:
        sys_topic.close()


def gateway_config(tmp: Path, port: int, auth: tuple[str, str] | None) -> Path:
    manifests = write_manifests(
        tmp / "m.yaml",
        [model_doc("counter", "plant", [{"name": "count", "type": "INT"}])]
        + [device_doc(d, "plant", "counter", NODE) for d in DEVICES],
    )
    mqtt: dict[str, object] = {"url": f"mqtt://127.0.0.1:{port}", "client_id": "edgetwin-outage"}
    if auth:
        mqtt.update(username=auth[0], password=auth[1])
    cfg = {"node": NODE, "store": {"path": str(tmp / "s.db")}, "mqtt": mqtt, "manifests": [str(manifests)]}
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def total_versions(gw: GatewayProcess) -> int:
    from tests.conftest import run_cli

    total = 0
    for dev in DEVICES:
        out = run_cli("twin", "get", f"plant/{dev}", "--json", "--config", str(gw.config))
        total += json.loads(out.stdout)["twin"]["count"].get("reported", {}).get("version", 0)
    return total


@pytest.fixture
def broker_dir() -> Iterator[Path]:
    """A folder mosquitto can use after it drops root for its own user, as the packaged
    broker's /etc/mosquitto and /var/lib/mosquitto are (pytest's tmp_path is private)."""
    folder = Path(tempfile.mkdtemp(prefix="edgetwin-broker-"))
    folder.chmod(0o755)
    (folder / "data").mkdir(mode=0o777)
    (folder / "data").chmod(0o777)
    (folder / "mosquitto.log").touch(mode=0o666)
    (folder / "mosquitto.log").chmod(0o666)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_the_documented_mosquitto_settings_keep_a_gateway_outage_without_a_drop(
    tmp_path: Path, broker_dir: Path
) -> None:
    port = free_port()
    conf = broker_dir / "mosquitto.conf"
    conf.write_text(localise(documented_mosquitto_conf(), port, broker_dir))
    gw_auth, mapper_auth = ("edgetwin", "gw-secret"), ("mapper", "mapper-secret")
    passwd = broker_dir / "passwd"
    for i, (user, password) in enumerate((gw_auth, mapper_auth)):
        flags = ["-c"] if i == 0 else []
        subprocess.run(["mosquitto_passwd", *flags, "-b", str(passwd), user, password], check=True)
    broker = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stderr=subprocess.PIPE)
    gw = GatewayProcess(gateway_config(tmp_path, port, gw_auth), port, NODE, tmp_path / "gw.log", gw_auth)
    try:
        wait_port(port)
        # mosquitto 2.x with these settings refuses anonymous clients...
        anonymous = paho.Client(CallbackAPIVersion.VERSION2)
        anonymous.connect("127.0.0.1", port)
        refused = threading.Event()
        anonymous.on_connect = lambda c, u, f, reason, p: refused.set() if reason.is_failure else None
        anonymous.loop_start()
        assert refused.wait(5), "an anonymous client was accepted"
        anonymous.loop_stop()
        # ... and accepts the gateway with its credentials.
        gw.start()
        gw.stop()  # the outage: its session (and subscriptions) stay with the broker
        acked = publish_at_rate(port, mapper_auth, total=20_000, rate=1_000)
        assert acked == 20_000
        gw.start()
        deadline = time.monotonic() + 60
        while total_versions(gw) < acked:
            assert time.monotonic() < deadline, f"applied {total_versions(gw)} of {acked}"
            time.sleep(0.5)
        assert total_versions(gw) == acked  # every update applied once
        assert broker_dropped(port, mapper_auth) == 0
        assert gw.stop() == 0
    finally:
        gw.stop()  # also when a check failed: never leave a gateway running
        broker.terminate()
        broker.wait(10)


def test_messages_the_broker_drops_are_reported_by_the_gateway(tmp_path: Path) -> None:
    """A broker with a small session queue (here 100; mosquitto's default is 1,000):
    during a gateway outage it acknowledges updates to the publisher and drops them.
    The gateway cannot get them back, but it says so: metric and warning."""
    broker = Mosquitto(tmp_path, extra="max_queued_messages 100\nsys_interval 1\n")
    gw = GatewayProcess(gateway_config(tmp_path, broker.port, None), broker.port, NODE, tmp_path / "gw.log")
    try:
        gw.start()
        gw.stop()
        publish_at_rate(broker.port, ("", ""), total=1_000, rate=5_000)
        metrics = Collector(broker.port, [f"edgetwin/{NODE}/gateway/metrics"])
        try:
            gw.start()
            doc = metrics.json_on(
                f"edgetwin/{NODE}/gateway/metrics",
                20,
                where=lambda d: d.get("broker_messages_dropped", 0) > 0,
            )
        finally:
            metrics.close()
        assert doc["broker_messages_dropped"] >= 800
        # mosquitto republishes the retained count every sys_interval: the gateway may
        # first see the count from before the burst and then the rise, or the final count.
        acked_warning = "dropped messages it had acknowledged"
        log_text = gw.log.read_text()
        assert "the MQTT broker reports messages dropped" in log_text or acked_warning in log_text
        warned_before = log_text.count(acked_warning)
        # Later drops, while the gateway runs, are warned about as they happen: here
        # another client's persistent session overflows while it is away.
        away = paho.Client(CallbackAPIVersion.VERSION2, client_id="away", clean_session=False)
        away.connect("127.0.0.1", broker.port)
        away.subscribe("$hw/events/device/+/twin/update", qos=1)
        away.loop(1)
        away.disconnect()
        publish_at_rate(broker.port, ("", ""), total=1_000, rate=5_000)
        deadline = time.monotonic() + 20
        while gw.log.read_text().count(acked_warning) <= warned_before:
            assert time.monotonic() < deadline, gw.log.read_text()[-2000:]
            time.sleep(0.2)
    finally:
        gw.stop()  # also when a check failed: never leave a gateway running
        broker.stop()
