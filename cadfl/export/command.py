"""`cadfl export`: write, check and measure a context model file."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from .files import (
    TOLERANCE,
    check,
    quantize_int8,
    require_mobile,
    write_atomic,
    write_onnx,
    write_torchscript,
)
from .model import ExportError, class_images, context_model, full_model, load_source
from .report import measure, report_table


def export_command(args: argparse.Namespace) -> int:
    """`cadfl export`: write, check and (with --report) measure a context model file."""
    if args.trainable:
        return trainable_command(args)
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
            rows = measure(files, {"context": model, "full": full_model(src)}, test_x, test_y,
                            args.repeats if args.report is not None else 0)
        final = files["context int8" if args.int8 else "context"]
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, lambda p: p.write_bytes(final.read_bytes()))
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
        print(report_table(rows))
        print(f"wrote {path}")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return 0


def trainable_command(args: argparse.Namespace) -> int:
    """`cadfl export --trainable`: write the training program, checked step by step against
    PyTorch in ExecuTorch's runtime, and (with --report) measure it against the full model's."""
    from . import trainable as t

    if args.int8 or args.format != "onnx" or args.others:
        raise ExportError("--trainable writes a float ExecuTorch program of the context's "
                          "classes: drop --int8, --format and --others")
    t.require_executorch()
    out = Path(args.out)
    src = load_source(args.checkpoint, args.data_dir)
    train = t.run_train_config(src)
    batch = args.batch_size or train.batch_size
    model = context_model(src, args.classes)
    ds = src.dataset
    x, y = class_images(ds.train_x, ds.train_y, args.classes, batch * args.check_steps)
    data = t.batches(x, t.output_labels(model, y), batch, args.check_steps)
    program = t.training_program(model, batch)
    # Dropout masks come from each runtime's own generator: the step-for-step check runs on
    # the same program exported with dropout off.
    dropout = any(layer.kind == "dropout" and layer.p > 0 for layer in model.spec.layers)
    checked = t.training_program(model, batch, dropout=False) if dropout else program
    diffs = t.check_training(model, checked, data, train)
    if dropout:
        print("the model has dropout: checked on its program exported with dropout off")
    print(f"{model.kind} of classes {list(model.classes)}: {args.check_steps} SGD steps (lr "
          f"{train.lr}, momentum {train.momentum}, weight decay {train.weight_decay}, batch "
          f"{batch}) in ExecuTorch's runtime match PyTorch's in float64 (largest relative "
          f"weight difference {max(diffs['float64']):.1e}, tolerance "
          f"{t.TRAIN_TOLERANCE:.0e}; from PyTorch's float32 steps {max(diffs['float32']):.1e})")
    names = t.train_step(model).buffer_names
    meta = t.metadata(model, batch, train, names)
    if args.report is not None:
        full = full_model(src)
        programs = {"context": (model, program), "full": (full, t.training_program(full, batch))}
        rows = t.measure_training(programs, x, y, batch, train, args.repeats)
        meta_report = {"checkpoint": str(src.path), "checkpoint_sha256": src.record["sha256"],
                       "classes": list(model.classes), "batch_size": batch,
                       "latency": {"threads": 1, "repeats": args.repeats,
                                   "statistic": "median"}, "models": rows}
        path = Path(args.report) if args.report else out.with_suffix(".report.json")
        path.write_text(json.dumps(meta_report, indent=1))
        print(t.training_table(rows))
        print(f"wrote {path}")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda p: p.write_bytes(program))
    side = out.with_name(out.name + ".json")
    side.write_text(json.dumps(meta, indent=1))
    print(f"wrote {out} ({len(program) / 1e6:.2f} MB) and {side}")
    return 0
