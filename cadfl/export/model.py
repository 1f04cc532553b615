"""What is exported: a checkpoint's context sub-model (or a dense model restricted to the
context's logits) with its input normalisation, and its logits in PyTorch."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..cad.decouple import Decoupling
from ..cad.submodel import extract
from ..data.datasets import Dataset
from ..engine.checkpoint import CheckpointError, checkpoint_dataset, load_model_checkpoint
from ..models import ModelSpec, build_loaded

State = dict[str, torch.Tensor]

BATCH = 64

class ExportError(ValueError):
    """An export that cannot be made or that failed its check; the message is one line."""

@dataclass(frozen=True)
class Source:
    """A checkpoint with what export needs from its run: the dataset (statistics, images)
    and, for a decoupled model, where its class paths are."""

    path: Path
    spec: ModelSpec
    state: State
    record: dict[str, Any]
    dataset: Dataset
    decoupling: Decoupling | None

    @property
    def others(self) -> int:
        """Class id of the Others output when a model has one (one past the dataset's)."""
        return self.dataset.num_classes

    def class_name(self, cls: int) -> str:
        """Readable name of a class id."""
        return self.dataset.classes[cls] if cls < self.dataset.num_classes else "others"

@dataclass(frozen=True)
class ExportModel:
    """A network to export: its spec and weights, the class of each output, and its source."""

    kind: str  # "cad-submodel", "dense-restricted" or "full"
    spec: ModelSpec
    state: State
    source: Source

    @property
    def classes(self) -> tuple[int, ...]:
        """Global class id of every output, in output order."""
        return self.spec.class_ids

    def metadata(self) -> dict[str, str]:
        """What the file says about itself (ONNX metadata_props, TorchScript extra file);
        every value is JSON."""
        src, ds = self.source, self.source.dataset
        meta = {
            "producer": "cadfl", "kind": self.kind,
            "input": f"uint8 images N x {ds.input_shape[1]} x {ds.input_shape[2]} x "
                     f"{ds.input_shape[0]} (N x H x W x C), values 0-255; normalised inside",
            "output": "logits N x K, column i for class classes[i]",
            "classes": list(self.classes),
            "class_names": [src.class_name(c) for c in self.classes],
            "others": src.others if src.others in self.classes else None,
            "mean": list(ds.mean), "std": list(ds.std), "dataset": ds.name,
            "checkpoint": src.path.name, "checkpoint_sha256": src.record["sha256"],
            "algorithm": src.record.get("algorithm"), "round": src.record.get("round"),
            "spec": self.spec.to_dict(),
        }
        return {k: json.dumps(v) for k, v in meta.items()}

def load_source(checkpoint: str | Path, data_dir: str | None = None) -> Source:
    """Load a run's checkpoint, its dataset and (for CAD/Fed2) its decoupling."""
    path = Path(checkpoint)
    spec, state, record = load_model_checkpoint(path)
    structure = record.get("structure") or {}
    dec = Decoupling.from_dict(structure["decoupling"]) if structure.get("decoupled") else None
    if dec is not None and dec.spec != spec:
        raise CheckpointError(f"{path}: the saved decoupling does not describe the saved model")
    ds = checkpoint_dataset(path, record, data_dir)
    if tuple(spec.input_shape) != ds.input_shape:
        raise CheckpointError(f"{path}: model input {spec.input_shape} does not match the "
                              f"{ds.name} images {ds.input_shape}")
    return Source(path, spec, state, record, ds, dec)

def context_ids(src: Source, classes: Sequence[int], others: bool) -> tuple[int, ...]:
    """The output classes of a context: `classes` in the order given, then Others if asked."""
    real = [c for c in src.spec.class_ids if c != src.others]
    choices = ", ".join(f"{c} {src.class_name(c)}" for c in real)
    for c in classes:
        if c not in real:
            raise ExportError(f"class {c} is not a class of this model; choose among: {choices}"
                              + (" (Others is --others)" if c == src.others else ""))
    if len(set(classes)) != len(classes):
        raise ExportError(f"--classes {' '.join(map(str, classes))} names a class twice")
    if not others:
        return tuple(classes)
    if src.others not in src.spec.class_ids:
        raise ExportError("--others: this model has no Others output (it was trained without "
                          "cad.others)")
    return (*classes, src.others)

def restrict_dense(spec: ModelSpec, state: State, classes: Sequence[int]) -> tuple[ModelSpec,
                                                                                 State]:
    """The dense network with only the logits of `classes` (rows of the last layer)."""
    name, last = spec.names[-1], spec.layers[-1]
    rows = torch.tensor([spec.class_ids.index(c) for c in classes])
    sub = dict(state)
    for key in (f"{name}.weight", f"{name}.bias"):
        if key in sub:
            sub[key] = state[key].index_select(0, rows)
    layers = [*spec.layers[:-1], replace(last, out_ch=len(classes))]
    return spec.replace_layers(layers, tuple(classes)), sub

def context_model(src: Source, classes: Sequence[int], others: bool = False) -> ExportModel:
    """The context model of `classes` (and Others): a CAD sub-model for a decoupled
    checkpoint, else the dense model restricted to those logits."""
    ids = context_ids(src, classes, others)
    if src.decoupling is not None:
        spec, state, _ = extract(src.decoupling, src.state, ids)
        return ExportModel("cad-submodel", spec, state, src)
    spec, state = restrict_dense(src.spec, src.state, ids)
    return ExportModel("dense-restricted", spec, state, src)

def full_model(src: Source) -> ExportModel:
    """The checkpoint's whole model, every class: what a device gets without a context."""
    return ExportModel("full", src.spec, src.state, src)

class Inference(nn.Module):
    """uint8 images N x H x W x C -> logits, with the dataset's normalisation inside."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.net = net
        # (x/255 - mean)/std written as (x - 255 mean)/(255 std), as cadfl's training does.
        self.register_buffer("shift", torch.tensor(mean).mul(255).view(1, -1, 1, 1))
        self.register_buffer("scale", torch.tensor(std).mul(255).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for a uint8 batch N x H x W x C."""
        # NCHW in memory too: ExecuTorch's kernels want one dim order across an operator.
        x = images.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
        return self.net((x - self.shift) / self.scale)

def pytorch_logits(model: ExportModel, images: torch.Tensor) -> torch.Tensor:
    """The PyTorch model's logits for uint8 images N x C x H x W, normalised the way
    training normalises them (the reference the exported file must match)."""
    from ..data.augment import to_float

    net = build_loaded(model.spec, model.state).eval()
    ds = model.source.dataset
    with torch.no_grad():
        return torch.cat([net(to_float(b, ds.mean, ds.std)) for b in images.split(BATCH)])

def class_images(x: torch.Tensor, y: torch.Tensor, classes: Sequence[int], limit: int | None,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of `classes` (at most `limit`, a seeded draw) and their labels."""
    idx = torch.nonzero(torch.isin(y, torch.tensor(list(classes)))).flatten()
    if limit is not None and limit < len(idx):
        gen = torch.Generator().manual_seed(seed)
        idx = idx[torch.randperm(len(idx), generator=gen)[:limit]].sort().values
    return x[idx], y[idx]
