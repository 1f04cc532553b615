"""How much time the simulation engine adds to the training it does.

Times one FedAvg round of the engine (`Experiment.train_round`: payloads, model building, local
training, update cloning, FLOP accounting, float64 aggregation) against a bare PyTorch loop doing
the same training: the same model spec and initial weights, the same optimiser, the same batches
(same shuffling and the same augmentation call from the same seeded generator), the same number
of steps, then a plain float32 average. Data are random CIFAR-shaped (or digits-shaped) uint8
tensors in a synthetic `Dataset`, so no files are needed.

The two are run alternately (bare, engine, bare, engine, ...) in one process and medians are
reported, because a shared machine is noisy. Both start every repetition from the same weights,
so they do exactly the same work; the largest weight difference between the two results is
printed as a check (float32 round-off of the plain average against the engine's float64 one).

    .venv/bin/python benchmarks/engine_overhead.py --model alexnet --devices 2 \\
        --samples-per-device 128 --repeats 3
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time

import torch
import torch.nn.functional as F

from cadfl.config import load_config
from cadfl.data.augment import random_crop_flip, to_float
from cadfl.data.datasets import Dataset, channel_stats
from cadfl.engine.experiment import Experiment
from cadfl.engine.rounds import train_round
from cadfl.engine.sampling import sample_devices
from cadfl.fl.payload import State, TrainConfig
from cadfl.fl.strategy import device_seed
from cadfl.models import MODELS, build_model
from cadfl.models.zoo import DEFAULT_INPUT

NUM_CLASSES = 10


def synthetic_dataset(input_shape: tuple[int, int, int], train: int, test: int,
                      seed: int = 0) -> Dataset:
    """Random uint8 images with balanced random labels, augmented like CIFAR-10 (crop + flip)
    for 3-channel inputs and like digits (crop 1, no flip) otherwise."""
    g = torch.Generator().manual_seed(seed)
    train_x = torch.randint(0, 256, (train, *input_shape), dtype=torch.uint8, generator=g)
    test_x = torch.randint(0, 256, (test, *input_shape), dtype=torch.uint8, generator=g)
    train_y = torch.arange(train) % NUM_CLASSES
    test_y = torch.arange(test) % NUM_CLASSES
    mean, std = channel_stats(train_x)
    cifar = input_shape[0] == 3
    return Dataset("synthetic", train_x, train_y[torch.randperm(train, generator=g)], test_x,
                   test_y, [str(c) for c in range(NUM_CLASSES)], mean, std,
                   crop_padding=4 if cifar else 1, flip=cifar)


def bare_train(model: torch.nn.Module, xf: torch.Tensor, y: torch.Tensor, train: TrainConfig,
               crop_padding: int, flip: bool, seed: int, precision: str = "fp32") -> None:
    """Local SGD as a plain PyTorch loop on pre-normalised inputs: shuffled, augmented batches,
    the same seeds as the engine's device code; forward and loss under bf16 autocast with
    `precision` "bf16"."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=train.lr, momentum=train.momentum,
                          weight_decay=train.weight_decay)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # dropout
        gen = torch.Generator(xf.device).manual_seed(seed)
        for _ in range(train.epochs):
            order = torch.randperm(len(y), generator=gen, device=xf.device)
            for start in range(0, len(y), train.batch_size):
                idx = order[start:start + train.batch_size]
                xb = random_crop_flip(xf[idx], crop_padding, flip, gen)
                with torch.autocast(xf.device.type, torch.bfloat16, enabled=precision == "bf16"):
                    loss = F.cross_entropy(model(xb).float(), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()


def bare_round(exp: Experiment, rnd: int, state: State, models: dict[int, torch.nn.Module],
               inputs: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> State:
    """One FedAvg round written as a plain PyTorch loop over prebuilt models and pre-normalised
    inputs: load the global weights, SGD over shuffled augmented batches, average."""
    cfg, train = exp.cfg, exp.train_config()
    ids = sample_devices(cfg.seed, rnd, range(cfg.devices), cfg.sampled_per_round())
    ds = exp.dataset
    trained, sizes = [], []
    for d in ids:
        model = models[d]
        model.load_state_dict(state)
        xf, y = inputs[d]
        bare_train(model, xf, y, train, ds.crop_padding, ds.flip,
                   device_seed(train.seed, rnd, d))
        trained.append(model.state_dict())
        sizes.append(len(y))
    total = sum(sizes)
    out = {}
    for key, value in state.items():
        mean = sum(s[key].float() * (n / total) for s, n in zip(trained, sizes, strict=True))
        out[key] = mean if value.is_floating_point() else mean.round().to(value.dtype)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="alexnet", choices=list(MODELS),
                        help="model from the zoo (default alexnet, on 3x32x32 inputs)")
    parser.add_argument("--devices", type=int, default=2, help="devices, all train each round")
    parser.add_argument("--samples-per-device", type=int, default=128,
                        help="training images per device (default 128)")
    parser.add_argument("--batch-size", type=int, default=64, help="local batch size")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed rounds of each kind, alternating (default 3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own, i.e. OMP_NUM_THREADS or cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    shape = DEFAULT_INPUT[args.model]
    batch_norm = inspect.signature(MODELS[args.model]).parameters["batch_norm"].default
    ds = synthetic_dataset(shape, args.devices * args.samples_per_device, 200)
    cfg = load_config(None, [
        f"model={args.model}", f"batch_norm={str(batch_norm).lower()}",
        f"devices={args.devices}", "partition.scheme=iid", "sample=1.0",
        f"train.batch_size={args.batch_size}", "train.lr=0.01", 'algorithms=["fedavg"]'])
    exp = Experiment.setup(cfg, ds)
    strategy = exp.strategy("fedavg")
    init = strategy.initial_state(exp.init)

    # The bare loop's one-off preparation (not timed): a model per device, inputs normalised
    # once, in the same memory format as the engine uses.
    models, inputs = {}, {}
    for d in range(cfg.devices):
        data = exp.device_data[d]
        models[d] = build_model(exp.spec).to(memory_format=torch.channels_last)
        xf = to_float(data.x, data.mean, data.std).contiguous(memory_format=torch.channels_last)
        inputs[d] = (xf, data.y)

    steps = sum(-(-len(exp.device_data[d].y) // args.batch_size) for d in range(cfg.devices))
    print(f"model {args.model} (batch norm {batch_norm}), {cfg.devices} devices x "
          f"{args.samples_per_device} samples, batch {args.batch_size}: {steps} SGD steps per "
          f"round; torch threads {torch.get_num_threads()}")

    rnd = 1  # every repetition redoes round 1 from the same weights: identical work
    engine_state, _ = train_round(exp, strategy, rnd, init)  # warm-up (FLOP count is cached)
    bare_state = bare_round(exp, rnd, init, models, inputs)
    diff = max((engine_state[k].double() - bare_state[k].double()).abs().max().item()
               for k in init)
    print(f"check: largest |engine - bare| weight difference after one round: {diff:.2e}")

    bare_times, engine_times = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        bare_round(exp, rnd, init, models, inputs)
        bare_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        train_round(exp, strategy, rnd, init)
        engine_times.append(time.perf_counter() - start)
    bare, engine = statistics.median(bare_times), statistics.median(engine_times)
    print("bare   s/round: " + " ".join(f"{t:.3f}" for t in bare_times) + f"  median {bare:.3f}")
    print("engine s/round: " + " ".join(f"{t:.3f}" for t in engine_times)
          + f"  median {engine:.3f}")
    print(f"engine / bare: {engine / bare:.3f}  (overhead {100 * (engine / bare - 1):+.1f}%)")


if __name__ == "__main__":
    main()
