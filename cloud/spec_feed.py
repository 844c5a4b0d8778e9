"""What one node may see of one kind, as sync messages (``deviceapi.wire``): from the
gateway's last seen resourceVersion only what changed since; with none, or one the API
server no longer remembers (410 Gone), a relist: every object, then ``synced`` with the
names that exist so the gateway can drop the rest. Built on lightkube's list and watch.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.operators import BinaryOperator, SequenceOperator

log = logging.getLogger(__name__)


class NodeFeed:
    """Devices (or any namespaced kind) whose ``spec.nodeName`` is ``node``; with
    ``node=None`` every object of the kind (for kinds not bound to a node)."""

    def __init__(self, client: AsyncClient, res: Any, kind: str, node: str | None) -> None:
        self.client, self.res, self.kind, self.node = client, res, kind, node
        self.rv = ""  # the newest resourceVersion sent; a reconnecting gateway resumes from it
        self.relists = 0
        # Generation last sent per object: a change of status or metadata only (the relay's
        # own status writes, above all) does not travel over the narrowband link.
        self._generation: dict[str, int] = {}

    @property
    def _fields(self) -> dict[str, str | BinaryOperator | SequenceOperator] | None:
        return {"spec.nodeName": self.node} if self.node is not None else None

    async def _relist(self) -> AsyncIterator[dict[str, Any]]:
        self.relists += 1
        listing = self.client.list(self.res, namespace="*", fields=self._fields)
        names = []
        async for obj in listing:
            names.append(f"{obj.metadata.namespace}/{obj.metadata.name}")
            self._generation[names[-1]] = obj.metadata.generation or 0
            yield {"t": "upsert", "kind": self.kind, "obj": obj.to_dict()}
        self.rv = listing.resourceVersion
        yield {"t": "synced", "kind": self.kind, "names": names, "rv": self.rv}

    async def messages(self, resume_rv: str = "") -> AsyncIterator[dict[str, Any]]:
        """Runs until cancelled."""
        self.rv = resume_rv
        while True:
            if not self.rv:
                async for msg in self._relist():
                    yield msg
            try:
                async for op, obj in self.client.watch(
                    self.res, namespace="*", fields=self._fields, resource_version=self.rv
                ):
                    meta = obj.metadata
                    self.rv = meta.resourceVersion
                    key = f"{meta.namespace}/{meta.name}"
                    if op == "DELETED":
                        self._generation.pop(key, None)
                        yield {
                            "t": "delete",
                            "kind": self.kind,
                            "ns": meta.namespace,
                            "name": meta.name,
                            "rv": self.rv,
                        }
                    elif op in ("ADDED", "MODIFIED"):
                        generation = meta.generation or 0
                        if op == "MODIFIED" and self._generation.get(key) == generation:
                            continue  # status or metadata only: nothing for the edge
                        self._generation[key] = generation
                        yield {"t": "upsert", "kind": self.kind, "obj": obj.to_dict()}
            except ApiError as exc:
                if exc.status.code == 410:  # too old: the API server forgot; start over
                    log.info("watch expired; relisting", extra={"kind": self.kind, "node": self.node})
                    self.rv = ""
                    continue
                raise
