"""``edgetwin gateway run`` and ``edgetwin config check``: the gateway service, and a
config checked before it is served. (``edgetwin status`` is in cli/status.py, so that the
service does not load an HTTP client and the store reader it never uses.)"""

from __future__ import annotations

import argparse
import asyncio

from edgetwin.cli.common import EXIT_USAGE, CliError
from edgetwin.gateway.config import load_config
from edgetwin.gateway.manifests import load_manifests
from edgetwin.gateway.mapper_host import MapperLoadError, validate_devices
from edgetwin.gateway.process import run_gateway
from edgetwin.runtime import logs


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    logs.setup(args.log_level or cfg.log.level, cfg.log.format)
    return asyncio.run(run_gateway(cfg))


def config_check(args: argparse.Namespace) -> int:
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
