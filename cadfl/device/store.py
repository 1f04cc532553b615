"""The per-device state store: what each device keeps between rounds, keyed by what it is.

A device keeps the tensors its payload names in `keep` (kept batch-norm statistics, the model
of `local`, personal layers). They are stored per layer and class path, never matched by
shape: a tensor of a layer with class paths (channel groups, or the logits) is stored as one
entry per class, `"bn5.running_mean@3"` for class 3's rows; any other tensor as itself. A
device whose context changes from class 1 to class 2 therefore gets its own statistics for the
trunk and for the classes it had, and the cloud's for class 2. A device's own copy of a
layer (`personal/` tensors) is stored per class path the same way.

The store lives in memory up to a budget and spills the devices stored longest ago to
safetensors files past it; `flush` writes every changed device, which makes the directory a
checkpoint of the store. Every file remembers the round it was written in and keeps its
previous version, so a run resumed from round R reads each device as it was after round R.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..fl.payload import PERSONAL, State, matches
from ..models import ModelSpec

Entries = dict[str, torch.Tensor]


def path_rows(spec: ModelSpec, key: str, tensor: torch.Tensor) -> list[tuple[int, slice]] | None:
    """(class id, rows) of every class path in `tensor` (state key `key` of `spec`'s model),
    or None if the tensor belongs to no path (a trunk tensor, or a scalar). A device's own
    copy of a tensor (`personal/KEY`) has KEY's paths."""
    name = key.removeprefix(PERSONAL).split(".", 1)[0]
    if name not in spec.names or tensor.dim() == 0:
        return None
    layer = spec.layer(name)
    if name == spec.names[-1]:
        groups = (1,) * spec.num_classes  # logit c is class c's, dense or not
    elif layer.groups is not None and len(layer.groups) == spec.num_classes:
        groups = layer.groups
    else:
        return None
    if tensor.shape[0] != sum(groups):
        return None
    out, start = [], 0
    for cls, size in zip(spec.class_ids, groups, strict=True):
        out.append((cls, slice(start, start + size)))
        start += size
    return out


def kept_entries(spec: ModelSpec, state: State, keep: tuple[str, ...]) -> Entries:
    """The entries a device stores from its trained `state`: the tensors matching `keep`,
    split by class path."""
    out: Entries = {}
    for key, t in state.items():
        if not matches(key, keep):
            continue
        rows = path_rows(spec, key, t)
        if rows is None:
            out[key] = t
        else:
            out.update({f"{key}@{cls}": t[r] for cls, r in rows})
    return out


def with_kept(spec: ModelSpec, state: State, keep: tuple[str, ...], entries: Entries) -> State:
    """`state` (a payload's) with the device's own stored values in place of the cloud's,
    wherever the device holds an entry for that tensor or class path, and with the kept
    tensors the cloud does not send at all."""
    if not entries:
        return state
    out = dict(state)
    for key, t in state.items():
        if not matches(key, keep):
            continue
        rows = path_rows(spec, key, t)
        if rows is None:
            if key in entries:
                out[key] = _checked(entries[key], t, key)
            continue
        own = [(r, entries[f"{key}@{cls}"]) for cls, r in rows if f"{key}@{cls}" in entries]
        if own:
            merged = t.clone()
            for r, v in own:
                merged[r] = _checked(v, merged[r], key)
            out[key] = merged
    # What the device keeps that the cloud never sends (its personal model, its control
    # variate) joins the payload as it is; its own copy of a layer with class paths, from
    # the cloud's tensor with the rows of the classes it has a copy of in place.
    out.update({k: v for k, v in entries.items()
                if k not in state and "@" not in k and matches(k, keep)})
    for copy in {k.split("@", 1)[0] for k in entries if "@" in k} - set(state):
        shared = copy.removeprefix(PERSONAL)
        if copy == shared or shared not in state or not matches(copy, keep):
            continue
        merged = state[shared].clone()
        for cls, r in path_rows(spec, shared, merged) or ():
            if f"{copy}@{cls}" in entries:
                merged[r] = _checked(entries[f"{copy}@{cls}"], merged[r], copy)
        out[copy] = merged
    return out


def _checked(mine: torch.Tensor, theirs: torch.Tensor, key: str) -> torch.Tensor:
    if mine.shape != theirs.shape:
        raise ValueError(f"{key}: the device keeps a tensor of shape {tuple(mine.shape)} where "
                         f"the model now has {tuple(theirs.shape)}")
    return mine.to(theirs.dtype)


def _nbytes(entries: Entries) -> int:
    return sum(t.numel() * t.element_size() for t in entries.values())


class DeviceStore:
    """Per-device kept tensors, in memory up to `budget_bytes`, spilled to `directory`.

    With no directory everything stays in memory (and nothing can be flushed or resumed).
    """

    def __init__(self, directory: Path | None = None, budget_bytes: int = 512 << 20) -> None:
        self.directory, self.budget = directory, budget_bytes
        self._memory: OrderedDict[int, Entries] = OrderedDict()
        self._dirty: set[int] = set()
        self._bytes = 0
        self._round = 0  # the round whose changes are being recorded

    def get(self, device: int) -> Entries:
        """The device's entries (empty if it kept nothing yet); changes nothing: a spilled
        device is read from its file and stays there."""
        if device in self._memory:
            return self._memory[device]
        return self._read(device)

    def put(self, device: int, entries: Entries) -> None:
        """Merge new entries into the device's (its other entries stay)."""
        if not entries:
            return
        merged = {**self.get(device), **{k: v.detach().cpu() for k, v in entries.items()}}
        self._remember(device, merged)
        self._dirty.add(device)
        self._spill()

    def flush(self, rnd: int) -> None:
        """Write every device changed since the last flush (the store's checkpoint)."""
        for device in sorted(self._dirty):
            self._write(device, self._memory[device], rnd)
        self._dirty.clear()

    def memory_bytes(self) -> int:
        """Bytes of tensors held in memory now."""
        return self._bytes

    def _remember(self, device: int, entries: Entries) -> None:
        self._bytes -= _nbytes(self._memory.pop(device, {}))
        self._memory[device] = entries
        self._bytes += _nbytes(entries)

    def _spill(self) -> None:
        if self.directory is None:
            return
        while self._bytes > self.budget and len(self._memory) > 1:
            device, entries = self._memory.popitem(last=False)
            self._bytes -= _nbytes(entries)
            if device in self._dirty:
                self._write(device, entries, self._round)
                self._dirty.discard(device)

    def _path(self, device: int, prev: bool = False) -> Path:
        assert self.directory is not None
        return self.directory / f"{device}{'.prev' if prev else ''}.safetensors"

    def _write(self, device: int, entries: Entries, rnd: int) -> None:
        if self.directory is None:
            raise RuntimeError("an in-memory device store cannot be flushed: give it a directory")
        self.directory.mkdir(parents=True, exist_ok=True)
        path, tmp = self._path(device), self._path(device).with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in entries.items()}, str(tmp),
                  metadata={"round": json.dumps(rnd)})
        if path.exists() and _round_of(path) != rnd:
            os.replace(path, self._path(device, prev=True))
        os.replace(tmp, path)

    def _read(self, device: int) -> Entries:
        if self.directory is None or not self._path(device).exists():
            return {}
        with safe_open(str(self._path(device)), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118

    def begin_round(self, rnd: int) -> None:
        """What devices keep from now on is written as round `rnd`'s (for `resume`)."""
        self._round = rnd

    def resume(self, rnd: int) -> None:
        """Go back to the store as it was after round `rnd` (a resumed run): a file written
        by a later round, which the run's checkpoint does not cover, gives way to its previous
        version (or goes, if that is later too)."""
        self._memory.clear()
        self._dirty.clear()
        self._bytes = 0
        if self.directory is None or not self.directory.is_dir():
            return
        for path in sorted(self.directory.glob("*.safetensors")):
            if path.name.endswith(".prev.safetensors") or _round_of(path) <= rnd:
                continue
            prev = path.with_name(path.name.replace(".safetensors", ".prev.safetensors"))
            if prev.exists() and _round_of(prev) <= rnd:
                os.replace(prev, path)
            else:
                path.unlink()
                prev.unlink(missing_ok=True)


def _round_of(path: Path) -> int:
    with safe_open(str(path), "pt") as f:
        return int(json.loads((f.metadata() or {}).get("round", "0")))
