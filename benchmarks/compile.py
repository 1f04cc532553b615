"""Does `torch.compile` pay for device training on this CPU? Cold and warm, against eager.

Devices train one after another, each on a fresh model built from the payload's spec and
weights, for one short local epoch. So a compiled step pays its compilation once (cold: the
first device), then must be faster on every later device (warm: fresh model instances of the
same spec, whose weights are graph inputs and need no recompiling) to win it back. This runs
the bare loop of `engine_overhead.py` (same batches and augmentation) eagerly and with
`torch.compile(model)` at each precision, and prints the cold time, the warm images/s and how
many device epochs the compilation takes to win back.

    .venv/bin/python benchmarks/compile.py --models lenet5 digits_cnn fl_cnn
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from engine_overhead import bare_train, synthetic_dataset
from throughput import machine_header

from cadfl.data.augment import to_float
from cadfl.device.precision import memory_format
from cadfl.fl.payload import TrainConfig
from cadfl.models import MODELS, build_loaded, build_model, get_model


def device_epochs(name: str, precision: str, compiled: bool, devices: int, samples: int,
                  batch_size: int) -> list[float]:
    """Seconds of one local epoch of each of `devices` devices (a fresh model each)."""
    spec = get_model(name, 10)
    ds = synthetic_dataset(spec.input_shape, samples, 10)
    fmt = memory_format(precision)
    xf = to_float(ds.train_x, ds.mean, ds.std).contiguous(memory_format=fmt)
    cfg = TrainConfig(batch_size=batch_size, lr=0.01)
    torch.manual_seed(0)
    state = build_model(spec).state_dict()
    torch._dynamo.reset()
    times = []
    for d in range(devices):
        model = build_loaded(spec, state).to(memory_format=fmt)
        run = torch.compile(model) if compiled else model
        start = time.perf_counter()
        bare_train(run, xf, ds.train_y, cfg, ds.crop_padding, ds.flip, d, precision)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["lenet5", "digits_cnn", "fl_cnn"],
                        choices=list(MODELS))
    parser.add_argument("--devices", type=int, default=6, help="devices trained in a row")
    parser.add_argument("--samples", type=int, default=500, help="images per device epoch")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    print(machine_header(torch.device("cpu")))
    print(f"{args.devices} devices in a row, {args.samples} images each, batch "
          f"{args.batch_size}; warm = median of devices 2..{args.devices}")
    print(f"{'model':<11} {'precision':<9} {'eager img/s':>11} {'compiled img/s':>14} "
          f"{'warm gain':>9} {'cold s':>7} {'break-even epochs':>17}")
    for name in args.models:
        for precision in ("fp32", "bf16"):
            eager = device_epochs(name, precision, False, args.devices, args.samples,
                                  args.batch_size)
            comp = device_epochs(name, precision, True, args.devices, args.samples,
                                 args.batch_size)
            e, c = statistics.median(eager[1:]), statistics.median(comp[1:])
            cold = comp[0] - e  # compilation, beyond what the epoch itself costs
            gain = e - c
            even = f"{cold / gain:.0f}" if gain > 0 else "never"
            print(f"{name:<11} {precision:<9} {args.samples / e:>11.0f} "
                  f"{args.samples / c:>14.0f} {e / c:>8.2f}x {cold:>7.1f} {even:>17}",
                  flush=True)


if __name__ == "__main__":
    main()
