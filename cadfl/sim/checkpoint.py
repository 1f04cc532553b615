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
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..models import ModelSpec, build_model


class CheckpointError(RuntimeError):
    """A checkpoint that is missing a file, truncated or altered; names the file."""


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(directory: Path, name: str, state: dict[str, torch.Tensor],
                    record: dict[str, Any]) -> None:
    """Write `name.safetensors` and `name.json` (the record plus the weights' hash)."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / f"{name}.safetensors"
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    _atomic_write(weights, lambda p: save_file(tensors, str(p)))
    meta = {**record, "sha256": _sha256(weights)}
    _atomic_write(directory / f"{name}.json",
                  lambda p: p.write_text(json.dumps(meta, indent=1, sort_keys=True)))


def load_checkpoint(directory: Path, name: str
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The state and record saved under `name`, None if there is none; CheckpointError if bad."""
    meta_path, weights = directory / f"{name}.json", directory / f"{name}.safetensors"
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint record {meta_path} is corrupt: {exc}") from None
    if not weights.exists():
        raise CheckpointError(f"checkpoint weights {weights} are missing")
    if _sha256(weights) != meta.get("sha256"):
        raise CheckpointError(f"checkpoint weights {weights} do not match their recorded "
                              "SHA-256 (truncated or altered)")
    return load_file(str(weights)), meta


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
    if record.get("spec"):
        spec = ModelSpec.from_dict(record["spec"])
    elif "spec" not in record:
        spec = _spec_from_run_config(path, state, record)
    else:
        raise CheckpointError(f"{path} holds no single model (algorithm "
                              f"{record.get('algorithm')!r} has no global model)")
    with torch.device("meta"):
        keys = build_model(spec).state_dict().keys()
    return spec, {k: state[k] for k in keys}, record


DENSE = ("fedavg", "fedprox", "central")


def _spec_from_run_config(path: Path, state: dict[str, torch.Tensor], record: dict
                          ) -> ModelSpec:
    """The dense model of a checkpoint written before records carried their spec, from the
    run directory's config.toml."""
    from ..cad.decouple import decouple
    from ..models.zoo import DEFAULT_INPUT, get_model
    from .config import load_config

    config = path.parent.parent / "config.toml"
    if not config.exists() or record.get("algorithm") not in DENSE + ("cad", "fed2"):
        raise CheckpointError(f"{path}: its record names no model spec; re-run to get one")
    cfg = load_config(config)
    fcs = [k for k in state if k.startswith("fc") and k.endswith(".weight")]
    logits = state[max(fcs, key=lambda k: int(k[2:].split(".")[0]))].shape[0]
    record["dataset"] = cfg.dataset
    spec = get_model(cfg.model, logits, DEFAULT_INPUT[cfg.model], cfg.batch_norm)
    if record["algorithm"] in DENSE:
        return spec
    return decouple(spec, logits, int(cfg.cad.depth)).spec
