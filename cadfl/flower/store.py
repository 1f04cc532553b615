"""A device's kept tensors in its Flower node's `Context.state`: the runtime's store on a node.

`NodeStore` has the `get`/`put` of `cadfl.device.DeviceStore`, so a `Runtime` on a Flower node
keeps batch-norm statistics, personal layers or a `local` model where the device is, entries
keyed by layer and class path exactly as in the simulation. Each algorithm of a run has an
`ArrayRecord` of its own per device (a run may train several algorithms on the same nodes).
Flower keeps `Context.state` for the whole run on the node (also across the subprocesses of a
deployment), never sending it to the server.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, RecordDict

from ..device.store import Entries

PREFIX = "cadfl-store"


class NodeStore:
    """Per-device kept tensors of algorithm `algorithm` in a node's `Context.state`."""

    def __init__(self, state: RecordDict, algorithm: str) -> None:
        self.state, self.algorithm = state, algorithm

    def _key(self, device: int) -> str:
        return f"{PREFIX}.{self.algorithm}.{device}"

    def get(self, device: int) -> Entries:
        """The device's entries (empty if it kept nothing yet)."""
        record = self.state.array_records.get(self._key(device))
        if record is None:
            return {}
        return {k: torch.from_numpy(a.numpy().copy()) for k, a in record.items()}

    def put(self, device: int, entries: Entries) -> None:
        """Merge new entries into the device's (its other entries stay)."""
        if not entries:
            return
        merged = {**self.get(device), **entries}
        self.state[self._key(device)] = ArrayRecord(
            {k: v.detach().cpu().contiguous() for k, v in merged.items()})
