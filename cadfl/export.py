"""`cadfl export`: a device's context model as one standalone file for mobile inference.

For a CAD (or Fed2) checkpoint the file holds the context sub-model of the chosen classes: the
trunk plus only those classes' paths, physically smaller (`cadfl.cad.submodel.extract`). For a
dense checkpoint (FedAvg and friends) it holds the whole network with only those classes'
logits, for comparison. Either way the file takes uint8 images N x H x W x C, as a camera or
an image decoder delivers them, normalises them inside the graph with the run's dataset
statistics, and returns one logit per context class in the order its metadata lists, next to
the class names, the checkpoint's SHA-256 and the model spec.

Every ONNX file is run in onnxruntime (CPU execution provider) before it is written, and its
logits are compared with the PyTorch model's on real test images of the context classes and
on random images; a difference above `TOLERANCE` stops the export. `--int8` quantises with
onnxruntime's static post-training quantisation, calibrated on training images of the context
classes, and reports the accuracy change; `--report` measures size, parameters, multiply-adds,
onnxruntime latency (one thread, batch 1, the full model's file and the context file side by
side) and context accuracy.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import statistics
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .analysis.profile import profile_spec
from .cad.decouple import Decoupling
from .cad.submodel import extract
from .data.datasets import Dataset
from .device.score import restricted_predictions
from .engine.checkpoint import CheckpointError, checkpoint_dataset, load_model_checkpoint
from .models import ModelSpec, build_loaded, count_params

State = dict[str, torch.Tensor]

FORMATS = ("onnx", "torchscript")
MOBILE_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
# Allowed |runtime - PyTorch| on any logit, relative to the largest PyTorch logit of the check
# (at least 1): float32 kernels of different libraries sum in different orders, which moves
# logits by ~1e-6 relative; a wrong graph moves them by far more than 1e-4.
TOLERANCE = 1e-4
BATCH = 64


class ExportError(ValueError):
    """An export that cannot be made or that failed its check; the message is one line."""


def require_mobile() -> None:
    """Fail with the extra to install when onnx, onnxscript or onnxruntime is missing."""
    missing = [p for p in MOBILE_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise ExportError(f"ONNX export needs {', '.join(missing)}: pip install 'cadfl[mobile]'")


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
        x = images.permute(0, 3, 1, 2).to(torch.float32)
        return self.net((x - self.shift) / self.scale)


def pytorch_logits(model: ExportModel, images: torch.Tensor) -> torch.Tensor:
    """The PyTorch model's logits for uint8 images N x C x H x W, normalised the way
    training normalises them (the reference the exported file must match)."""
    from .data.augment import to_float

    net = build_loaded(model.spec, model.state).eval()
    ds = model.source.dataset
    with torch.no_grad():
        return torch.cat([net(to_float(b, ds.mean, ds.std)) for b in images.split(BATCH)])


def _example(model: ExportModel, n: int = 2) -> torch.Tensor:
    c, h, w = model.spec.input_shape
    return torch.zeros(n, h, w, c, dtype=torch.uint8)


def _module(model: ExportModel) -> Inference:
    ds = model.source.dataset
    return Inference(build_loaded(model.spec, model.state).eval(), ds.mean, ds.std).eval()


def write_onnx(model: ExportModel, path: Path) -> None:
    """Write the model as one ONNX file (weights inside, batch size dynamic, metadata)."""
    import onnx

    # The exporter warns once per missing torchvision operator; cadfl needs none of them.
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        program = torch.onnx.export(
            _module(model), (_example(model),), dynamo=True, verbose=False,
            input_names=["images"], output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},))
    finally:
        registration.setLevel(level)
    proto = program.model_proto
    for key, value in model.metadata().items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))


def write_torchscript(model: ExportModel, path: Path) -> None:
    """Write the model as a TorchScript file, metadata in its extra file `cadfl.json`."""
    traced = torch.jit.trace(_module(model), _example(model))
    torch.jit.save(traced, str(path), _extra_files={"cadfl.json": json.dumps(model.metadata())})


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of an exported file (ONNX or TorchScript), values decoded from JSON."""
    path = Path(path)
    if zipfile.is_zipfile(path):  # TorchScript archives are zip files; ONNX is protobuf
        extra = {"cadfl.json": ""}
        torch.jit.load(str(path), _extra_files=extra)
        raw = json.loads(extra["cadfl.json"])
    else:
        import onnx

        raw = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    return {k: json.loads(v) for k, v in raw.items()}


def session(path: str | Path, threads: int = 1) -> Any:
    """An onnxruntime CPU session of `path`, `threads` intra-op threads, one inter-op."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: ORT's warnings would drown the report
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def file_logits(path: str | Path, images: torch.Tensor) -> torch.Tensor:
    """Logits of an exported file (ONNX in onnxruntime, else TorchScript) for uint8 images
    N x C x H x W (transposed here to the file's N x H x W x C)."""
    nhwc = images.permute(0, 2, 3, 1).contiguous()
    if zipfile.is_zipfile(path):
        net = torch.jit.load(str(path))
        with torch.no_grad():
            return torch.cat([net(b) for b in nhwc.split(BATCH)])
    sess = session(path)
    return torch.cat([torch.from_numpy(sess.run(None, {"images": b.numpy()})[0])
                      for b in nhwc.split(BATCH)])


def check(model: ExportModel, path: Path, images: torch.Tensor) -> float:
    """Compare the file's logits with the PyTorch model's on `images` (uint8 N x C x H x W);
    returns the relative difference, ExportError when it exceeds TOLERANCE."""
    ref, got = pytorch_logits(model, images), file_logits(path, images)
    if got.shape != ref.shape:
        raise ExportError(f"the exported file returns logits of shape {tuple(got.shape)}, "
                          f"PyTorch {tuple(ref.shape)}")
    diff = float((got - ref).abs().max()) / max(1.0, float(ref.abs().max()))
    if not diff <= TOLERANCE:  # also catches NaN
        raise ExportError(f"the exported file's logits differ from PyTorch's by {diff:.2e} "
                          f"(relative; tolerance {TOLERANCE:.0e}) on {len(images)} images")
    return diff


def class_images(x: torch.Tensor, y: torch.Tensor, classes: Sequence[int], limit: int | None,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of `classes` (at most `limit`, a seeded draw) and their labels."""
    idx = torch.nonzero(torch.isin(y, torch.tensor(list(classes)))).flatten()
    if limit is not None and limit < len(idx):
        gen = torch.Generator().manual_seed(seed)
        idx = idx[torch.randperm(len(idx), generator=gen)[:limit]].sort().values
    return x[idx], y[idx]


def accuracy(logits: torch.Tensor, labels: torch.Tensor, outputs: Sequence[int],
             classes: Sequence[int]) -> float:
    """Share of images whose highest logit among `classes` (class ids; a subset of the
    file's `outputs`) is their label."""
    pred = restricted_predictions(logits, outputs, classes)
    return float((pred == labels).double().mean())


def quantize_int8(src_path: Path, out_path: Path, calibration: torch.Tensor) -> None:
    """onnxruntime static post-training quantisation (QDQ, int8 per-channel weights, uint8
    activations) of `src_path`, calibrated on uint8 images N x C x H x W."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            nhwc = calibration.permute(0, 2, 3, 1).contiguous()
            self.batches = iter([{"images": b.numpy()} for b in nhwc.split(BATCH)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        # Folding and shape inference first, as onnxruntime's quantisation guide asks.
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src_path), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out_path), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
    # quantize_static keeps the graph but not our metadata: copy it over.
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(src_path)).metadata_props}
    proto = onnx.load(str(out_path))
    del proto.metadata_props[:]
    for key, value in {**meta, "quantization": json.dumps(
            f"onnxruntime static int8 (QDQ), calibrated on {len(calibration)} training "
            "images of the context classes")}.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(out_path))


def latency_ms(paths: dict[str, Path], image: torch.Tensor, repeats: int,
               warmup: int = 10) -> dict[str, float]:
    """Median onnxruntime latency of one image (batch 1, one thread) for each file, measured
    side by side: the files take turns in every repetition, so machine load hits all alike."""
    feed = {"images": image.permute(1, 2, 0).unsqueeze(0).contiguous().numpy()}
    sessions = {name: session(p, threads=1) for name, p in paths.items()}
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, feed)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(repeats):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feed)
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def multiply_adds(spec: ModelSpec) -> int:
    """Multiply-adds of one forward pass of one image (FLOPs counted by torch / 2)."""
    return int(profile_spec(spec).totals["flops"]) // 2


def _atomic(path: Path, write) -> None:
    # Written beside the target, then renamed: a failed check never leaves a file behind.
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export_command(args: argparse.Namespace) -> int:
    """`cadfl export`: write, check and (with --report) measure a context model file."""
    onnx_needed = args.format == "onnx" or args.int8 or args.report is not None
    if args.format != "onnx" and (args.int8 or args.report is not None):
        raise ExportError("--int8 and --report work on ONNX files: use --format onnx")
    if onnx_needed:
        require_mobile()
    out = Path(args.out)
    src = load_source(args.checkpoint, args.data_dir)
    model = context_model(src, args.classes, args.others)
    ds = src.dataset
    test_x, test_y = class_images(ds.test_x, ds.test_y, args.classes, args.test_images)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (8, *ds.input_shape), generator=gen, dtype=torch.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        float_path = work / f"context.{'onnx' if onnx_needed else 'pt'}"
        (write_onnx if onnx_needed else write_torchscript)(model, float_path)
        diff = check(model, float_path, torch.cat([test_x, noise]))
        runtime = "onnxruntime" if onnx_needed else "TorchScript"
        print(f"{model.kind} of classes {list(model.classes)} "
              f"({', '.join(src.class_name(c) for c in model.classes)}): {runtime} matches "
              f"PyTorch on {len(test_x)} test + {len(noise)} random images (largest relative "
              f"difference {diff:.1e}, tolerance {TOLERANCE:.0e})")
        files = {"context": float_path}
        if args.report is not None:
            full_path = work / "full.onnx"
            write_onnx(full_model(src), full_path)
            files["full"] = full_path
        if args.int8:
            calib, _ = class_images(ds.train_x, ds.train_y, args.classes, args.calibration)
            for name, path in list(files.items()):
                files[f"{name} int8"] = work / f"{name}-int8.onnx"
                quantize_int8(path, files[f"{name} int8"], calib)
        rows = {}
        if len(files) > 1 or args.report is not None:
            rows = _measure(files, {"context": model, "full": full_model(src)}, test_x, test_y,
                            args.repeats if args.report is not None else 0)
        final = files["context int8" if args.int8 else "context"]
        out.parent.mkdir(parents=True, exist_ok=True)
        _atomic(out, lambda p: p.write_bytes(final.read_bytes()))
    if args.int8:
        f, q = rows["context"]["accuracy"], rows["context int8"]["accuracy"]
        print(f"int8: context accuracy {q:.4f} against float {f:.4f} ({q - f:+.4f}) on "
              f"{len(test_x)} test images of the context; calibrated on {args.calibration} "
              "training images")
    if args.report is not None:
        report = {"checkpoint": str(src.path), "checkpoint_sha256": src.record["sha256"],
                  "kind": model.kind, "classes": list(model.classes),
                  "class_names": [src.class_name(c) for c in model.classes],
                  "test_images": len(test_x), "latency": {"batch": 1, "threads": 1,
                                                          "repeats": args.repeats,
                                                          "statistic": "median"},
                  "models": rows}
        path = Path(args.report) if args.report else out.with_suffix(".report.json")
        path.write_text(json.dumps(report, indent=1))
        print(_report_table(rows))
        print(f"wrote {path}")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return 0


def _measure(files: dict[str, Path], models: dict[str, ExportModel], test_x: torch.Tensor,
             test_y: torch.Tensor, repeats: int) -> dict[str, dict[str, Any]]:
    """Per file: size, parameters, multiply-adds, context accuracy (the highest logit among
    the context file's outputs, Others included), and latency when `repeats`."""
    lat = latency_ms(files, test_x[0], repeats) if repeats else {}
    rows = {}
    for name, path in files.items():
        model = models[name.split()[0]]
        logits = file_logits(path, test_x)
        rows[name] = {"file_bytes": path.stat().st_size, "params": count_params(model.spec),
                      "multiply_adds": multiply_adds(model.spec),
                      "accuracy": accuracy(logits, test_y, model.classes,
                                           models["context"].classes)}
        if name in lat:
            rows[name]["latency_ms"] = lat[name]
    return rows


def _report_table(rows: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'model':<14} {'file MB':>8} {'params':>11} {'MMACs':>8} {'latency ms':>10} "
             f"{'accuracy':>8}"]
    for name, r in rows.items():
        lines.append(f"{name:<14} {r['file_bytes'] / 1e6:>8.2f} {r['params']:>11,} "
                     f"{r['multiply_adds'] / 1e6:>8.1f} {r.get('latency_ms', 0):>10.3f} "
                     f"{r['accuracy']:>8.4f}")
    full, ctx = rows.get("full"), rows["context"]
    if full:
        lines.append(f"context / full: file {ctx['file_bytes'] / full['file_bytes']:.2f}x, "
                     f"multiply-adds {ctx['multiply_adds'] / full['multiply_adds']:.2f}x, "
                     f"latency {ctx['latency_ms'] / full['latency_ms']:.2f}x")
    return "\n".join(lines)
