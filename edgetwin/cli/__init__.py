"""The ``edgetwin`` command: its parser and the dispatch to one module per command group
(``gateway``, ``twin``, ``cloud``, ``sim``), each imported only when its command runs.

Exit status: 0 success; 1 the operation failed (rejected value, no gateway answer,
runtime error); 2 bad configuration, manifest or arguments (one message naming what).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from pathlib import Path

from edgetwin.cli.common import EXIT_FAILED, EXIT_USAGE, CliError
from edgetwin.deviceapi import ManifestError
from edgetwin.gateway.config import ConfigError
from edgetwin.gateway.mapper_host import MapperLoadError
from edgetwin.gateway.mqtt.broker import BrokerStartError
from edgetwin.gateway.store.schema import SchemaTooNew, StoreError
from edgetwin.runtime.version import __version__

DEFAULT_GATEWAY_CONFIG = Path("/etc/edgetwin/gateway.yaml")
DEFAULT_RELAY_CONFIG = Path("/etc/edgetwin/relay.yaml")
LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


def _default_config(env: str, default: Path) -> Path:
    """``--config`` may be left out: the environment variable, else the system path."""
    value = os.environ.get(env)
    return Path(value) if value else default


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Each option's help ends with its default (unless the help says it already, or
    there is none to show); descriptions keep their lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # By identity: a default of 0 is shown (0 == False would hide it).
        default = action.default
        shown = (
            not (default is None or default is False or default is argparse.SUPPRESS) and not action.required
        )
        if shown and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


Subcommands = argparse._SubParsersAction  # argparse's own type for add_subparsers()


def _command(
    sub: Subcommands[argparse.ArgumentParser], name: str, run: str, help: str, description: str | None = None
) -> argparse.ArgumentParser:
    """A subcommand that runs ``module:function`` of ``edgetwin.cli`` when chosen."""
    parser = sub.add_parser(name, help=help, description=description or help, formatter_class=_Formatter)
    parser.set_defaults(run=run)
    return parser


def _group(
    sub: Subcommands[argparse.ArgumentParser], name: str, help: str, dest: str = "action"
) -> Subcommands[argparse.ArgumentParser]:
    parser = sub.add_parser(name, help=help, description=help, formatter_class=_Formatter)
    return parser.add_subparsers(dest=dest, required=True, metavar="COMMAND")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgetwin",
        description="Offline-tolerant sync gateway with device twins",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"edgetwin {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gateway_config = _default_config("EDGETWIN_CONFIG", DEFAULT_GATEWAY_CONFIG)
    config_help = "the gateway's config file (default: $EDGETWIN_CONFIG, else /etc/edgetwin/gateway.yaml)"

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", type=Path, default=gateway_config, help=config_help)
        return p

    def with_json(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        return p

    gw = _group(sub, "gateway", "the edge gateway service")
    run = with_config(_command(gw, "run", "gateway:run", "run the gateway"))
    run.add_argument("--log-level", choices=LOG_LEVELS, help="log level (default: the config's log.level)")

    twin = _group(sub, "twin", "read and set device twins")
    get = _command(twin, "get", "twin:get", "show a device's twin (works while the gateway runs)")
    get.add_argument("device", help="NAMESPACE/NAME")
    with_config(with_json(get))
    with_config(
        with_json(
            _command(twin, "list", "twin:list_", "list devices: source, readiness, state, pending status")
        )
    )
    events = _command(
        twin, "events", "twin:events", "the local event log: conflicts, rejected values, failed writes"
    )
    events.add_argument("device", nargs="?", help="NAMESPACE/NAME (all devices if omitted)")
    events.add_argument(
        "--kind",
        choices=["conflict", "rejected", "write_failed", "read_error", "state"],
        help="only events of this kind",
    )
    events.add_argument("--limit", type=int, default=50, help="the newest N events")
    with_config(with_json(events))
    set_ = _command(twin, "set", "twin:set_", "set edge-local desired values, applied by the running gateway")
    set_.add_argument("device", help="NAMESPACE/NAME")
    set_.add_argument("assignments", nargs="+", metavar="PROP=VALUE", help="desired values to set")
    with_config(set_)
    set_.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the gateway's answer")

    with_config(
        with_json(
            _command(
                sub,
                "status",
                "status:status",
                "the gateway's health in one screen: link, outbox, devices, errors",
            )
        )
    )
    cfg = _group(sub, "config", "configuration")
    with_config(_command(cfg, "check", "gateway:config_check", "validate a config and its manifests"))

    sim = _group(sub, "sim", "device simulators", dest="kind")
    modbus = _command(sim, "modbus", "sim:sim_modbus", "a Modbus TCP boiler controller whose values move")
    modbus.add_argument("--host", default="127.0.0.1", help="address to listen on")
    modbus.add_argument("--port", type=int, default=5020, help="Modbus TCP port")
    modbus.add_argument("--unit", type=int, default=1, help="the unit id (slave id) it answers as")
    ble = _command(
        sim,
        "ble",
        "sim:sim_ble",
        "emulated BLE sensors (Bumble) on a virtual radio; centrals attach over HCI on TCP",
        description="Emulated BLE sensors (Bumble) on a virtual radio; centrals attach over HCI on TCP.\n"
        "Connect with mappers: {ble: {hci: tcp-client:HOST:PORT}}. Control lines on stdin:\n"
        "drop NAME | silence NAME SECONDS | state NAME | quit.",
    )
    ble.add_argument("--host", default="127.0.0.1", help="address to listen on")
    ble.add_argument("--port", type=int, default=9000, help="HCI over TCP port for centrals")
    ble.add_argument("--count", type=int, default=1, help="environmental sensors env-sensor-1..N")
    ble.add_argument("--beacons", type=int, default=0, help="advertisement-only beacons beacon-1..N")
    ble.add_argument("--prefix", default="env-sensor", help="sensor name prefix")
    ble.add_argument(
        "--notify-interval", type=float, default=1.0, help="seconds between value changes and notifications"
    )

    cloud = _group(sub, "cloud", "the cloud side: relay, CRDs, a Kubernetes API emulator")
    crun = _command(
        cloud, "run", "cloud:run", "run the cloud relay (gRPC, mutual TLS) against a Kubernetes API"
    )
    crun.add_argument(
        "--config",
        type=Path,
        default=_default_config("EDGETWIN_RELAY_CONFIG", DEFAULT_RELAY_CONFIG),
        help="the relay's config file (default: $EDGETWIN_RELAY_CONFIG, else /etc/edgetwin/relay.yaml)",
    )
    crun.add_argument("--log-level", choices=LOG_LEVELS, help="log level (default: the config's log.level)")
    _command(
        cloud,
        "crds",
        "cloud:crds",
        "print the CustomResourceDefinitions edgetwin needs (edgetwin cloud crds | kubectl apply -f -)",
    )
    emu = _command(
        cloud,
        "kube-emulator",
        "cloud:kube_emulator",
        "a Kubernetes API emulator for the edgetwin CRDs (development stand-in, not for production)",
    )
    emu.add_argument("--host", default="127.0.0.1", help="address to listen on")
    emu.add_argument("--port", type=int, default=8001, help="HTTP port")
    emu.add_argument("--crds", help="CRD file or folder (default: the CRDs edgetwin ships)")
    emu.add_argument("--kubeconfig", help="write a kubeconfig for kubectl here")
    emu.add_argument("--namespace", default="default", help="the kubeconfig's namespace")

    demo = _command(
        sub,
        "demo",
        "sim:demo",
        "the offline promise in steps: devices report, the link is cut, the gateway restarts, "
        "the link returns, kubectl shows every value",
        description="A self-contained demo on embedded defaults: simulated Modbus, BLE and virtual\n"
        "devices, an embedded MQTT broker, the relay behind a link simulator and a Kubernetes API\n"
        "emulator read with kubectl. It cuts the link, restarts the gateway while the link is down,\n"
        "restores the link, checks every value in kubectl get devices and prints a summary.\n"
        "Exit status 0 when nothing was lost.",
    )
    demo.add_argument("--steps", action="store_true", help="wait for Enter before each step")
    demo.add_argument(
        "--no-story",
        action="store_true",
        help="only run the system (devices, gateway, relay, API emulator), link up, until stopped",
    )
    demo.add_argument(
        "--cut-seconds",
        type=float,
        default=12.0,
        help="how long the link stays cut (the gateway restarts halfway)",
    )
    after = demo.add_mutually_exclusive_group()
    after.add_argument(
        "--keep-running",
        dest="keep_running",
        action="store_const",
        const=True,
        help="keep running after the summary until Ctrl-C (default when stdin is a terminal)",
    )
    after.add_argument(
        "--exit",
        dest="keep_running",
        action="store_const",
        const=False,
        help="stop after the summary (default when stdin is not a terminal)",
    )
    demo.add_argument(
        "--duration", type=float, default=None, help="stop after this many seconds, wherever the story is"
    )
    demo.add_argument(
        "--workdir",
        help="keep the store, config, PKI and kubeconfig here "
        "(default: a temporary folder, removed at the end)",
    )
    demo.add_argument("--mqtt-port", type=int, default=0, help="the embedded broker's port (0: a free one)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module, _, function = args.run.partition(":")
    try:
        command = getattr(importlib.import_module(f"edgetwin.cli.{module}"), function)
        status: int = command(args)
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
