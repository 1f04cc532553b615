"""Device-training throughput: images/s of cadfl's device code against a bare PyTorch loop.

For each model, times `train_local` (what every device runs) on the dense model and on a CAD
sub-model holding half of the classes, next to the bare loop of `engine_overhead.py` training
the same spec on the same pre-normalised tensors with the same batches and augmentation. The
FLOP rate (forward + backward FLOPs counted by torch, per second) is set against the machine's
float32 matrix-multiply rate measured in the same run. Runs alternate (bare, cadfl, bare, ...)
and medians are reported, because a shared machine is noisy.

For the small models (lenet5, digits_cnn, fl_cnn) one more row trains `--devices` same-shape
device models (each its own weights, seed and samples) with `train_batched` at once, against
the bare loop training them one after another on the same data with the same augmentation.

    .venv/bin/python benchmarks/throughput.py --models alexnet vgg16 --samples 256
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from engine_overhead import bare_train, synthetic_dataset

from cadfl.cad.decouple import decouple
from cadfl.cad.submodel import extract
from cadfl.data.augment import to_float
from cadfl.data.datasets import Dataset
from cadfl.fl.device import DeviceData, train_flops_per_sample, train_local
from cadfl.fl.payload import Payload, TrainConfig
from cadfl.models import MODELS, ModelSpec, build_loaded, build_model, get_model
from cadfl.runtime.batched import train_batched

DEPTH = {"lenet5": 0, "alexnet": 2, "vgg11": 2, "vgg16": 3, "digits_cnn": 1, "fl_cnn": 1}
BATCHED = ("lenet5", "digits_cnn", "fl_cnn")  # small models: a batched-devices row each


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """The machine's float32 matrix-multiply rate (GFLOP/s), best of `repeats`."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(spec: ModelSpec, state: dict, data: DeviceData, cfg: TrainConfig, repeats: int
            ) -> tuple[float, float]:
    """Median seconds of one local epoch: (bare loop, cadfl's train_local)."""
    payload = Payload(spec, state, cfg)
    keep = torch.isin(data.y, torch.tensor(spec.class_ids))
    lut = torch.full((data.num_classes,), -1, dtype=torch.long)
    lut[torch.tensor(spec.class_ids)] = torch.arange(spec.num_classes)
    xf = to_float(data.x[keep], data.mean, data.std).contiguous(memory_format=torch.channels_last)
    y = lut[data.y[keep]]
    model = build_loaded(spec, state).to(memory_format=torch.channels_last)
    train_local(payload, data)  # warm-up, and the FLOP count is cached
    bare, ours = [], []
    for _ in range(repeats):
        model.load_state_dict(state)
        bare.append(_timed(lambda: bare_train(model, xf, y, cfg, data.crop_padding, data.flip,
                                              cfg.seed)))
        ours.append(_timed(lambda: train_local(payload, data)))
    return statistics.median(bare), statistics.median(ours)


def measure_batched(spec: ModelSpec, ds: Dataset, cfg: TrainConfig, devices: int, samples: int,
                    repeats: int) -> tuple[float, float]:
    """Median seconds of one local epoch of `devices` devices of `samples` images each:
    (bare loop device after device, `train_batched` of all)."""
    jobs, bare_jobs = [], []
    for d in range(devices):
        torch.manual_seed(d)
        state = build_model(spec).state_dict()
        index = torch.arange(d * samples, (d + 1) * samples)
        data = DeviceData(ds.train_x, ds.train_y, 10, ds.mean, ds.std, ds.crop_padding, ds.flip,
                          index)
        payload = Payload(spec, state, TrainConfig(**{**cfg.to_dict(), "seed": d}))
        jobs.append((payload, data))
        xf = to_float(data.x, data.mean, data.std).contiguous(memory_format=torch.channels_last)
        model = build_loaded(spec, state).to(memory_format=torch.channels_last)
        bare_jobs.append((model, state, xf, data.y, d))

    def bare() -> None:
        for model, state, xf, y, seed in bare_jobs:
            model.load_state_dict(state)
            bare_train(model, xf, y, cfg, ds.crop_padding, ds.flip, seed)

    train_batched(jobs)  # warm-up
    bare()
    bare_times, batched = [], []
    for _ in range(repeats):
        bare_times.append(_timed(bare))
        batched.append(_timed(lambda: train_batched(jobs)))
    return statistics.median(bare_times), statistics.median(batched)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["alexnet", "vgg16"], choices=list(MODELS))
    parser.add_argument("--samples", type=int, default=256, help="training images per epoch")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs of each kind")
    parser.add_argument("--classes", type=int, default=5, help="classes of the CAD sub-model")
    parser.add_argument("--devices", type=int, default=10, help="devices of the batched rows")
    args = parser.parse_args()
    peak = matmul_gflops()
    print(f"torch threads {torch.get_num_threads()}; float32 matmul rate {peak:.0f} GFLOP/s; "
          f"{args.samples} images per epoch, batch {args.batch_size}")
    print(f"{'model':<22} {'bare img/s':>10} {'cadfl img/s':>11} {'cadfl/bare':>10} "
          f"{'GFLOP/s':>8} {'of matmul':>9}")
    cfg = TrainConfig(batch_size=args.batch_size, lr=0.01)
    for name in args.models:
        dense = get_model(name, 10)
        ds = synthetic_dataset(dense.input_shape, args.samples, 10)
        dec = decouple(dense, 10, DEPTH[name])
        torch.manual_seed(0)
        sub_spec, sub_state, _ = extract(dec, build_model(dec.spec).state_dict(),
                                         range(args.classes))
        variants = [(name, dense, build_model(dense).state_dict()),
                    (f"{name} CAD {args.classes}/10", sub_spec, sub_state)]
        for label, spec, state in variants:
            # The sub-model trains on its own classes only: give it as many images.
            g = torch.Generator().manual_seed(1)
            y = torch.tensor(spec.class_ids)[torch.randint(0, spec.num_classes, (args.samples,),
                                                           generator=g)]
            data = DeviceData(ds.train_x, y, 10, ds.mean, ds.std, ds.crop_padding, ds.flip)
            bare, ours = measure(spec, state, data, cfg, args.repeats)
            rate = train_flops_per_sample(spec) * args.samples / ours / 1e9
            print(f"{label:<22} {args.samples / bare:>10.0f} {args.samples / ours:>11.0f} "
                  f"{bare / ours:>10.2f} {rate:>8.0f} {rate / peak:>9.0%}", flush=True)
        if name in BATCHED:
            many = synthetic_dataset(dense.input_shape, args.devices * args.samples, 10)
            bare, ours = measure_batched(dense, many, cfg, args.devices, args.samples,
                                         args.repeats)
            images = args.devices * args.samples
            rate = train_flops_per_sample(dense) * images / ours / 1e9
            print(f"{f'{name} batched x{args.devices}':<22} {images / bare:>10.0f} "
                  f"{images / ours:>11.0f} {bare / ours:>10.2f} {rate:>8.0f} "
                  f"{rate / peak:>9.0%}", flush=True)


if __name__ == "__main__":
    main()
