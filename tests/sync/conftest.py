"""The sync tests' whole system on loopback: ``stack_factory(docs, **options)`` starts a
Stack (gateway, link simulator, relay, API emulator) on the module's mosquitto and
stops every one it made."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from edgetwin.simulators.stack import Stack, StackOptions
from tests.conftest import write_manifests
from tests.harness.processes import Mosquitto
from tests.sync.promises import NODE


@pytest.fixture
async def stack_factory(tmp_path: Path, mosquitto: Mosquitto) -> AsyncIterator[Any]:
    stacks: list[Stack] = []

    async def make(docs: list[dict[str, Any]] | None = None, **options: Any) -> Stack:
        manifests = [write_manifests(tmp_path / "manifests.yaml", docs)] if docs else []
        stack = Stack(
            tmp_path / f"stack{len(stacks)}",
            StackOptions(
                node=NODE, mqtt_url=f"mqtt://127.0.0.1:{mosquitto.port}", manifests=manifests, **options
            ),
        )
        stacks.append(stack)
        await stack.start()
        return stack

    yield make
    for stack in stacks:
        await stack.stop()
