"""Device-training throughput at each precision: images/s of a bare PyTorch loop and of
cadfl's `train_local`, fp32 against bf16, with and without channels-last.

For each model, one local epoch over the same synthetic images is timed:
- the bare loop of `engine_overhead.py` (pre-normalised inputs, the same batches and
  augmentation, torch's SGD) at fp32 and bf16 (autocast), each in NCHW and channels-last;
- `train_local` (what every device runs) at fp32 and bf16, in cadfl's memory formats
  (channels-last weights; images stored channels-last at bf16, NCHW at fp32:
  `cadfl.device.precision.memory_format`), dense and as a CAD sub-model holding half of the
  classes;
- for the small models, `train_batched` of `--devices` same-shape devices at once.
Runs alternate (every variant once, then again, ...) and medians are reported, because a
shared machine is noisy. The header prints the CPU and whether it has AMX / AVX512-BF16: the
bf16 gains below are this CPU's, not a claim for another one.

    .venv/bin/python benchmarks/throughput.py                       # lenet5 fl_cnn alexnet vgg16
    .venv/bin/python benchmarks/throughput.py --models alexnet vgg16 --device cuda --samples 2048
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch
from engine_overhead import bare_train, synthetic_dataset

from cadfl.cad.decouple import decouple
from cadfl.cad.submodel import extract
from cadfl.data.augment import to_float
from cadfl.data.datasets import Dataset
from cadfl.device.batched import train_batched
from cadfl.device.compute import resolve_device, to_compute
from cadfl.device.precision import cpu_bf16_flags, memory_format
from cadfl.device.train import DeviceData, train_local
from cadfl.fl.payload import Payload, TrainConfig
from cadfl.models import MODELS, ModelSpec, build_loaded, build_model, get_model

DEPTH = {"lenet5": 0, "alexnet": 2, "vgg11": 2, "vgg16": 3, "digits_cnn": 1, "fl_cnn": 1}
BATCHED = ("lenet5", "digits_cnn", "fl_cnn")  # small models: batched-devices rows
# The goals for bf16 over fp32 on an AMX CPU (train_local), and for train_local
# against the bare loop at every precision.
GOALS = {"fl_cnn": 3.5, "alexnet": 3.0, "vgg16": 1.6}
ENGINE_GOAL = 0.95
FORMATS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}


def machine_header(device: torch.device) -> str:
    """The CPU (or GPU), its bf16 flags and torch's threads, for the benchmark's header."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                      if line.startswith("Model name")), platform.processor())
    except (OSError, subprocess.CalledProcessError):
        model = platform.processor() or "unknown CPU"
    flags = cpu_bf16_flags()
    shown = ", ".join(flags) if flags else "none (no AMX, no AVX512-BF16: bf16 is slow here)"
    head = (f"CPU: {model}; bf16 flags: {shown}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")
    if device.type == "cuda":
        head += f"; GPU: {torch.cuda.get_device_name(device)}"
    return head


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 2048,
                repeats: int = 5) -> float:
    """The device's matrix-multiply rate (GFLOP/s) in `dtype`, best of `repeats`."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / min(_timed(lambda: a @ b, device) for _ in range(repeats + 1)) / 1e9


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def medians(variants: dict[str, Callable[[], object]], repeats: int, device: torch.device
            ) -> dict[str, float]:
    """Median seconds of each variant, run alternately after one warm-up of each."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for k, fn in variants.items():
            times[k].append(_timed(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


def bare_variants(spec: ModelSpec, state: dict, data: DeviceData, cfg: TrainConfig
                  ) -> dict[str, Callable[[], object]]:
    """The bare loop at each (precision, memory format), on pre-normalised inputs."""
    keep = torch.isin(data.y, torch.tensor(spec.class_ids, device=data.compute))
    lut = torch.full((data.num_classes,), -1, dtype=torch.long, device=data.compute)
    lut[torch.tensor(spec.class_ids)] = torch.arange(spec.num_classes, device=data.compute)
    y = lut[data.y[keep]]
    out = {}
    for precision in ("fp32", "bf16"):
        for fmt_name, fmt in FORMATS.items():
            xf = to_float(data.x[keep], data.mean, data.std).contiguous(memory_format=fmt)
            model = build_loaded(spec, state, data.compute).to(memory_format=fmt)

            def run(model=model, xf=xf, precision=precision) -> None:
                model.load_state_dict(state)
                bare_train(model, xf, y, cfg, data.crop_padding, data.flip, cfg.seed,
                           precision)
            out[f"bare {precision} {fmt_name}"] = run
    return out


def batched_variants(spec: ModelSpec, ds: Dataset, cfg: TrainConfig, devices: int,
                     samples: int) -> dict[str, Callable[[], object]]:
    """`devices` devices of `samples` images each: `train_local` one after another and
    `train_batched` of all, at each precision."""
    out = {}
    for precision in ("fp32", "bf16"):
        on = to_compute(ds, ds.train_x.device, memory_format(precision))
        jobs = []
        for d in range(devices):
            torch.manual_seed(d)
            state = build_model(spec).state_dict()
            index = torch.arange(d * samples, (d + 1) * samples, device=ds.train_x.device)
            data = DeviceData(on.train_x, on.train_y, 10, on.mean, on.std, on.crop_padding,
                              on.flip, index)
            payload = Payload(spec, state, TrainConfig(**{**cfg.to_dict(), "seed": d,
                                                          "precision": precision}))
            jobs.append((payload, data))
        out[f"sequential {precision}"] = lambda jobs=jobs: [train_local(p, d) for p, d in jobs]
        out[f"batched {precision}"] = lambda jobs=jobs: train_batched(jobs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["lenet5", "fl_cnn", "alexnet", "vgg16"],
                        choices=list(MODELS))
    parser.add_argument("--samples", type=int, default=256, help="training images per epoch")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs of each variant")
    parser.add_argument("--classes", type=int, default=5, help="classes of the CAD sub-model")
    parser.add_argument("--devices", type=int, default=10, help="devices of the batched rows")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--no-sub-model", action="store_true", help="skip the CAD rows")
    args = parser.parse_args()
    device = resolve_device(args.device)
    print(machine_header(device))
    rates = {p: matmul_rate(device, d) for p, d in (("fp32", torch.float32),
                                                    ("bf16", torch.bfloat16))}
    print(f"matmul GFLOP/s: fp32 {rates['fp32']:.0f}, bf16 {rates['bf16']:.0f}; "
          f"{args.samples} images per epoch, batch {args.batch_size}; medians of "
          f"{args.repeats} alternating epochs")
    print(f"{'model':<20} {'variant':<18} {'img/s':>8} {'x fp32':>7} {'x bare':>7}")
    amx = device.type == "cuda" or bool(cpu_bf16_flags())
    cfg = TrainConfig(batch_size=args.batch_size, lr=0.01)
    verdicts = []
    for name in args.models:
        dense = get_model(name, 10)
        ds = synthetic_dataset(dense.input_shape, args.samples, 10)
        variants = [(name, dense, build_model(dense).state_dict())]
        if not args.no_sub_model:
            torch.manual_seed(0)
            dec = decouple(dense, 10, DEPTH[name])
            sub_spec, sub_state, _ = extract(dec, build_model(dec.spec).state_dict(),
                                             range(args.classes))
            variants.append((f"{name} CAD {args.classes}/10", sub_spec, sub_state))
        for label, spec, state in variants:
            # The sub-model trains on its own classes only: give it as many images.
            g = torch.Generator().manual_seed(1)
            y = torch.tensor(spec.class_ids)[torch.randint(0, spec.num_classes, (args.samples,),
                                                           generator=g)]
            runs: dict[str, Callable[[], object]] = {}
            data = {}
            for precision in ("fp32", "bf16"):
                on = to_compute(ds, device, memory_format(precision))
                data[precision] = DeviceData(on.train_x, y.to(device), 10, on.mean, on.std,
                                             on.crop_padding, on.flip)
                payload = Payload(spec, state, TrainConfig(**{**cfg.to_dict(),
                                                              "precision": precision}))
                runs[f"train_local {precision}"] = (
                    lambda p=payload, d=data[precision]: train_local(p, d))
            if label == name:  # the bare loops once per model
                runs.update(bare_variants(spec, state, data["fp32"], cfg))
            secs = medians(runs, args.repeats, device)
            for key, sec in secs.items():
                kind, precision, *fmt = key.split(" ")
                base = secs[" ".join([kind, "fp32", *fmt])]
                bare = None
                if kind == "train_local":
                    fmt = ["cl"]  # its weights are channels-last at both precisions
                    bare = secs.get(f"bare {precision} {fmt[0]}")
                    if bare:
                        verdicts.append((f"{name} train_local/bare at {precision}", bare / sec,
                                         ENGINE_GOAL))
                shown = f"{kind} {precision} {fmt[0]}"
                print(f"{label:<20} {shown:<18} {args.samples / sec:>8.0f} {base / sec:>6.2f}x "
                      + (f"{bare / sec:>6.2f}x" if bare else ""), flush=True)
            if label == name and name in GOALS:
                gain = secs["train_local fp32"] / secs["train_local bf16"]
                verdicts.append((f"{name} bf16 over fp32 (train_local)", gain, GOALS[name]))
        if name in BATCHED:
            many = synthetic_dataset(dense.input_shape, args.devices * args.samples, 10)
            many = to_compute(many, device)
            secs = medians(batched_variants(dense, many, cfg, args.devices, args.samples),
                           args.repeats, device)
            images = args.devices * args.samples
            for key, s in secs.items():
                base = secs[key.replace("bf16", "fp32")]
                seq = secs[key.replace("batched", "sequential")]
                print(f"{f'{name} x{args.devices} devices':<20} {key:<18} {images / s:>8.0f} "
                      f"{base / s:>6.2f}x {seq / s:>6.2f}x (batched over sequential)", flush=True)
    print("\ngoals (bf16 gains on an AMX CPU; train_local within 5% of the bare loop):")
    for what, value, goal in verdicts:
        claim = "holds" if value >= goal else "does not hold"
        if "bf16 over" in what and not amx:
            claim = "not claimed: this CPU has no AMX / AVX512-BF16"
        print(f"  {what}: {value:.2f} (goal >= {goal}): {claim}")


if __name__ == "__main__":
    main()
