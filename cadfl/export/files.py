"""The exported files: ONNX and TorchScript written (atomically), read back, run in
onnxruntime, checked against PyTorch, and quantised to int8."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models import build_loaded
from .model import BATCH, ExportError, ExportModel, Inference, pytorch_logits

FORMATS = ("onnx", "torchscript")

MOBILE_PACKAGES = ("onnx", "onnxscript", "onnxruntime")

# Allowed |runtime - PyTorch| on any logit, relative to the largest PyTorch logit of the check
# (at least 1): float32 kernels of different libraries sum in different orders, which moves
# logits by ~1e-6 relative; a wrong graph moves them by far more than 1e-4.
TOLERANCE = 1e-4

def require_mobile() -> None:
    """Fail with the extra to install when onnx, onnxscript or onnxruntime is missing."""
    missing = [p for p in MOBILE_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise ExportError(f"ONNX export needs {', '.join(missing)}: pip install 'cadfl[mobile]'")

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

def write_atomic(path: Path, write) -> None:
    # Written beside the target, then renamed: a failed check never leaves a file behind.
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
