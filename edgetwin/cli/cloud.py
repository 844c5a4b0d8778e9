"""``edgetwin cloud run | crds | kube-emulator``: the relay, the CRDs it needs, and the
Kubernetes API emulator (a development stand-in) to try them without a cluster."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path

from edgetwin.cli.common import EXIT_USAGE, CliError, serve_until_interrupted
from edgetwin.cloud.app import RelayStartError, run_relay
from edgetwin.cloud.config import RelayConfigError, kube_config, load_relay_config
from edgetwin.deploy import CRDS, crds_yaml
from edgetwin.runtime import logs
from edgetwin.simulators.kube.emulator import Emulator
from edgetwin.simulators.kube.objects import BANNER
from edgetwin.simulators.kube.running import RunningEmulator


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_relay_config(args.config)
        kube = kube_config(cfg, str(args.config))
    except RelayConfigError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    logs.setup(args.log_level or cfg.log.level, cfg.log.format)  # the gateway's structured lines
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run_relay(cfg, kube))
    except RelayStartError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    return 0


def crds(args: argparse.Namespace) -> int:
    sys.stdout.write(crds_yaml())
    return 0


def kube_emulator(args: argparse.Namespace) -> int:
    where = Path(args.crds) if args.crds else CRDS
    files = sorted(where.glob("*.yaml")) if where.is_dir() else [where]
    if not files or not all(p.is_file() for p in files):
        raise CliError(f"no CRD files at {where} (give --crds with a CRD file or folder)")
    emulator = Emulator.from_files(files)
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

    return serve_until_interrupted(serve(), args.host, args.port)
