"""What ``edgetwin twin`` checks before it sends anything, and what ``twin events``
tells afterwards: against a real gateway and mosquitto, the gateway running or down."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from tests.conftest import (
    Collector,
    GatewayProcess,
    publish,
    run_cli,
    thermostat_gateway,
    update_payload,
)
from tests.harness.processes import Mosquitto

NODE = "edge-c"
DEV = "plant.thermo-1"
UPDATE = f"$hw/events/device/{DEV}/twin/update"


@pytest.fixture(scope="module")
def gateway(mosquitto: Mosquitto, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = thermostat_gateway(
        tmp_path_factory.mktemp("gw"), mosquitto.port, NODE, [("plant", "thermo-1"), ("lab", "thermo-1")]
    )
    yield gw
    gw.stop()


def twin(gw: GatewayProcess, *args: str) -> tuple[int, str, str]:
    out = run_cli("twin", *args, "--config", str(gw.config))
    return out.returncode, out.stdout, out.stderr


def events(gw: GatewayProcess, kind: str) -> list[dict]:
    code, out, err = twin(gw, "events", "plant/thermo-1", "--kind", kind, "--json")
    assert code == 0, err
    return list(json.loads(out))


def until(pred, within: float = 10.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + within
    while True:
        value = pred()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def test_a_bare_name_asks_for_namespace_and_name_and_names_the_matches(gateway: GatewayProcess) -> None:
    code, _, err = twin(gateway, "get", "thermo-1")
    assert code == 2
    assert "give the device as NAMESPACE/NAME" in err
    assert "lab/thermo-1" in err and "plant/thermo-1" in err
    code, _, err = twin(gateway, "get", "plant/thermo-2")
    assert code == 2 and "no device plant/thermo-2" in err and "did you mean plant/thermo-1" in err


def test_rejected_desired_values_and_reports_show_in_twin_events_with_their_reason(
    gateway: GatewayProcess, mosquitto: Mosquitto
) -> None:
    # An app other than the CLI (nothing checks before the gateway does).
    results = Collector(mosquitto.port, [f"{UPDATE}/result"])
    publish(
        mosquitto.port,
        UPDATE,
        json.dumps({"event_id": "bad-set", "twin": {"setpoint": {"expected": {"value": "abc"}}}}),
    )
    publish(mosquitto.port, UPDATE, update_payload({"temperature": "900"}, "hot"))
    publish(mosquitto.port, UPDATE, update_payload({"temprature": "20"}, "typo"))
    results.json_on(f"{UPDATE}/result", where=lambda d: d["event_id"] == "typo")
    results.close()
    rejected = until(lambda: len(events(gateway, "rejected")) >= 3 and events(gateway, "rejected"))
    assert rejected, events(gateway, "rejected")
    by_prop = {e["property"] or ",".join(e["detail"].get("names", [])): e["detail"] for e in rejected}
    assert by_prop["setpoint"]["desired"] == "abc" and by_prop["setpoint"]["origin"] == "edge"
    assert "number" in by_prop["setpoint"]["reason"]
    assert "above the maximum 150" in by_prop["temperature"]["reason"]
    assert "not a property" in by_prop["temprature"]["reason"]
    # The table: the reason, the refused value, and the unknown name as the property.
    code, out, _ = twin(gateway, "events", "plant/thermo-1", "--kind", "rejected")
    assert code == 0
    rows = out.splitlines()
    assert any("setpoint" in r and "desired abc from edge" in r for r in rows), out
    assert any("temprature" in r and "not a property" in r for r in rows), out
    # twin get: the column says what it holds.
    code, out, _ = twin(gateway, "get", "plant/thermo-1")
    assert code == 0 and "LAST ERROR" in out and "above the maximum 150" in out, out


def test_twin_set_is_refused_locally_with_the_gateway_down(gateway: GatewayProcess) -> None:
    gateway.stop()
    try:
        started = time.monotonic()
        code, _, err = twin(
            gateway,
            "set",
            "plant/thermo-1",
            "setpoint=abc",
            "temperature=3",
            "setpont=20",
            "enabled=maybe",
            "--timeout",
            "3",
        )
        assert code == 1, err
        assert time.monotonic() - started < 3  # answered from the store, no wait for a gateway
        assert "nothing was sent" in err
        assert "setpoint=abc" in err and "FLOAT" in err
        assert "temperature: the property is ReadOnly" in err
        assert "setpont: not a property of its DeviceModel; did you mean setpoint?" in err
        assert "enabled=maybe" in err
        code, _, err = twin(gateway, "set", "plant/thermo-1", "setpoint=99", "--timeout", "3")
        assert code == 1 and "above the maximum 35" in err
        # A value the model takes goes to the broker, for the gateway to take when it is back.
        code, _, err = twin(gateway, "set", "plant/thermo-1", "setpoint=21", "--timeout", "2")
        assert code == 1 and "did not answer within 2s" in err
    finally:
        gateway.start()


def test_twin_set_keeps_a_closed_sockets_registration_race_out_of_its_output(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """aiomqtt's race, made on purpose: the socket registration it schedules runs after
    the socket was closed (as when a broker refuses the TLS handshake). asyncio would print
    the callback's traceback; twin set's handler keeps it out, and passes other errors on."""
    import asyncio
    import logging
    import socket

    from edgetwin.cli.twin import quiet_socket_races

    def race(handler: object) -> list[str]:
        seen: list[str] = []

        async def main() -> None:
            loop = asyncio.get_running_loop()
            if handler is not None:
                loop.set_exception_handler(handler)  # type: ignore[arg-type]
            a, b = socket.socketpair()
            fd = a.fileno()
            loop.call_soon(loop.add_writer, fd, lambda: None)
            a.close()
            b.close()
            loop.call_soon(lambda: seen.append("other") or 1 / 0)  # any other error: still shown
            await asyncio.sleep(0.05)

        records: list[logging.LogRecord] = []

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                records.append(record)

        keep = Keep()
        logging.getLogger("asyncio").addHandler(keep)
        try:
            asyncio.run(main())
        finally:
            logging.getLogger("asyncio").removeHandler(keep)
        return [r.getMessage() + (r.exc_text or "") + repr(r.exc_info) for r in records]

    plain = race(None)
    assert any("add_writer" in m for m in plain), plain  # the race is real without the handler
    quiet = race(quiet_socket_races)
    assert not any("add_writer" in m for m in quiet), quiet
    assert any("ZeroDivisionError" in m for m in quiet), quiet  # other errors still reach asyncio
