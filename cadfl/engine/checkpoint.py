"""Checkpoints: the global state as safetensors (never pickle) plus a small JSON record.

Both files are written atomically (temporary file, fsync, rename), the JSON last, and the JSON
holds the SHA-256 of the weights file, so a checkpoint is either whole and verified or ignored.
No random-generator state needs saving: every random draw of a round (device sampling, local
shuffling, augmentation, dropout) is seeded from (seed, round, device), so the round number is
the whole RNG state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import dataset_of, load_config
from ..data.datasets import Dataset, load_dataset
from ..models import ModelSpec, state_shapes

log = logging.getLogger("cadfl")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing a file, truncated or altered; names the file."""


def _fsynced(path: Path, write) -> None:
    write(path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(directory: Path, name: str, state: dict[str, torch.Tensor],
                    record: dict[str, Any]) -> None:
    """Write `name.safetensors` and `name.json` (the record plus the weights' hash), keeping
    the previous pair as `name.prev.*`.

    Both new files are written and fsynced under temporary names first, then the old pair is
    renamed to `.prev` and the new pair into place. Whenever the process dies, some record on
    disk still matches some weights file by its hash, and `load_checkpoint` finds that pair.
    """
    directory.mkdir(parents=True, exist_ok=True)
    paths = {kind: directory / f"{name}.{kind}" for kind in ("safetensors", "json")}
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    tmp = {kind: p.with_name(p.name + ".tmp") for kind, p in paths.items()}
    _fsynced(tmp["safetensors"], lambda p: save_file(tensors, str(p)))
    meta = {**record, "sha256": _sha256(tmp["safetensors"])}
    _fsynced(tmp["json"], lambda p: p.write_text(json.dumps(meta, indent=1, sort_keys=True)))
    for kind in ("safetensors", "json"):
        if paths[kind].exists():
            os.replace(paths[kind], directory / f"{name}.prev.{kind}")
    for kind in ("safetensors", "json"):
        os.replace(tmp[kind], paths[kind])


def load_checkpoint(directory: Path, name: str
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest intact checkpoint saved under `name`, None if there is none.

    A record is intact when one of the weights files (`name.safetensors`, `name.prev.
    safetensors`) has the SHA-256 it names. When the latest checkpoint is truncated or altered,
    a warning names the bad file and the previous good one is used; CheckpointError when none
    is intact.
    """
    records, corrupt = [], []
    for meta_path in (directory / f"{name}.json", directory / f"{name}.prev.json"):
        if meta_path.exists():
            try:
                records.append((meta_path, json.loads(meta_path.read_text())))
            except json.JSONDecodeError:
                log.warning("checkpoint record %s is corrupt: ignored", meta_path)
                corrupt.append(meta_path)
    if not records:
        if corrupt:
            raise CheckpointError(f"checkpoint record {corrupt[0]} is corrupt")
        return None
    hashes = {p: _sha256(p) for p in (directory / f"{name}.safetensors",
                                      directory / f"{name}.prev.safetensors") if p.exists()}
    records.sort(key=lambda r: -r[1].get("round", 0))
    for meta_path, meta in records:
        match = [p for p, h in hashes.items() if h == meta.get("sha256")]
        if match:
            if meta_path.name != f"{name}.json" or match[0].name != f"{name}.safetensors":
                log.warning("checkpoint %s is missing, truncated or altered: resuming from "
                            "%s (round %s)", directory / f"{name}.safetensors", match[0],
                            meta.get("round"))
            try:
                return load_file(str(match[0])), meta
            except SafetensorError as exc:  # e.g. a pickle renamed .safetensors: never unpickled
                raise CheckpointError(f"{match[0]} is not a safetensors file: {exc}") from None
    raise CheckpointError(f"no intact checkpoint for {name!r}: "
                          f"{directory / (name + '.safetensors')} is missing or does not match "
                          f"the SHA-256 in {records[0][0]} (truncated or altered)")


def load_model_checkpoint(path: str | Path) -> tuple[ModelSpec, dict[str, torch.Tensor], dict]:
    """The model saved in a run's checkpoint file (`.../checkpoints/NAME.safetensors` or its
    `.json`): its spec, its weights (only the model's own tensors) and the record."""
    path = Path(path)
    if path.suffix not in (".safetensors", ".json"):
        raise CheckpointError(f"{path}: expected a checkpoint .safetensors or .json file")
    loaded = load_checkpoint(path.parent, path.stem)
    if loaded is None:
        raise CheckpointError(f"{path.with_suffix('.json')} is missing: not a cadfl checkpoint")
    state, record = loaded
    if not record.get("spec"):
        raise CheckpointError(f"{path} holds no single model (algorithm "
                              f"{record.get('algorithm')!r} has no global model)")
    spec = ModelSpec.from_dict(record["spec"])
    keys = state_shapes(spec).keys()
    return spec, {k: state[k] for k in keys}, record


def checkpoint_dataset(path: Path, record: dict[str, Any], data_dir: str | None = None
                       ) -> Dataset:
    """The dataset of the run a checkpoint (at `path`, with `record`) came from, with the
    run's dataset options: RUN/config.toml beside RUN/checkpoints/, else the record's name."""
    config = path.parent.parent / "config.toml"
    if config.exists():
        overrides = [f"data_dir={json.dumps(data_dir)}"] if data_dir else []
        return dataset_of(load_config(config, overrides))  # [folder] and [synthetic] too
    if not record.get("dataset"):
        raise CheckpointError(f"{path}: no run config.toml beside checkpoints/ and no dataset "
                              "in the record: cannot tell the input normalisation")
    return load_dataset(record["dataset"], data_dir)
