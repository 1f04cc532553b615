"""The `cadfl` command: one sub-command per job, each a thin layer over the library."""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__


class UserError(Exception):
    """A mistake in the command line, config or data: printed without a traceback."""


def _parse_shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W such as 3,32,32, got {text!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive sizes C,H,W, got {text!r}")
    return shape  # type: ignore[return-value]


def _add_model_compute(p: argparse.ArgumentParser) -> None:
    """--device, --precision (fp32) and --quiet, for commands that run a checkpoint's model."""
    p.add_argument("--device", default="auto",
                   help="where the model runs: auto (CUDA if there is one), cpu, cuda, cuda:N")
    _add_precision(p, "fp32")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_precision(p: argparse.ArgumentParser, default: str | None) -> None:
    """The --precision option (default None: the config's `precision`)."""
    from .device.precision import PRECISIONS

    said = f"default {default}" if default else "default: the config's precision, fp32 if unset"
    p.add_argument("--precision", choices=PRECISIONS, default=default,
                   help="how the model computes: fp32, bf16 (bfloat16 autocast; weights stay "
                   "float32) or auto (bf16 where the device runs it fast: a GPU with bf16, a "
                   f"CPU with AMX or AVX512-BF16); {said}")


def _with_precision(args: argparse.Namespace) -> list[str]:
    """The --set overrides of `args`, with --precision (when given) last."""
    given = [f'precision="{args.precision}"'] if args.precision else []
    return [*args.overrides, *given]


def _add_profile(sub: argparse._SubParsersAction) -> None:
    from .models import MODELS

    p = sub.add_parser(
        "profile", help="per-layer params, FLOPs, activation memory and energy of a model",
        description="Profile a model layer by layer: output shape, parameters, forward FLOPs "
        "(counted by torch.utils.flop_counter), activation memory and an energy estimate from a "
        "per-operation energy model (Horowitz, ISSCC 2014). With --compare, draw the share of "
        "FLOPs and energy in conv vs fully-connected layers for several models.")
    p.add_argument("model", nargs="?", choices=list(MODELS), metavar="MODEL",
                   help=f"model to profile, one of: {', '.join(MODELS)}")
    p.add_argument("--compare", nargs="+", choices=list(MODELS), metavar="MODEL",
                   help="profile several models and compare conv vs FC shares")
    p.add_argument("--input-shape", type=_parse_shape, metavar="C,H,W",
                   help="input shape (default: the model's own, 3,32,32 for CIFAR models)")
    p.add_argument("--num-classes", type=int, default=10, help="number of logits (default 10)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--plot", metavar="PNG", help="write a bar chart of conv/FC shares to PNG")
    p.set_defaults(handler=_cmd_profile)


def _cmd_profile(args: argparse.Namespace) -> int:
    from .analysis.profile import profile_command

    if not args.model and not args.compare:
        raise UserError("give a MODEL to profile or --compare MODEL [MODEL ...]")
    return profile_command(args)


def _algorithm_list() -> str:
    """Every registered algorithm with its family, the metric it is judged by, and one line."""
    from .fl import ALGORITHMS

    order = ("cad", "grouped", "sub-model", "global", "personalised", "reference")
    lines = ["algorithms (family, judged by):"]
    for name, cls in sorted(ALGORITHMS.items(), key=lambda a: (order.index(a[1].family), a[0])):
        lines.append(f"  {name:<9} {cls.family}, {cls.judged_by}: {cls.summary}")
    return "\n".join(lines)


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="simulate federated training: algorithms side by side on one partition",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run every algorithm of a config on the same data partition and initial "
        "weights, one process, deterministic for a seed.\n\nWith no CONFIG, runs the embedded "
        "demo, cadfl/demo.toml: the mission's cross-device setting, 100 devices x 2 "
        "classes of digits, a tenth of them per round, 40 rounds (about two minutes). The run "
        "directory gets config.toml, partition.json, metrics.jsonl (one line per round and "
        "algorithm), summary.md, curves.png, checkpoints/ and devices/ (what devices keep "
        "between rounds)."
        "\n\nDevices train on the config's `device` (auto: CUDA when torch sees a GPU). "
        "Updates are folded into the average as they arrive, so a round holds one update at "
        "a time however many devices take part; aggregation.rule = median or trimmed_mean "
        "need every holder's value at once and hold all of a round's updates.",
        epilog="examples:\n"
        "  cadfl run\n"
        "  cadfl run configs/cifar10-alexnet-5cls.toml --set data_fraction=0.2 --set rounds=30\n"
        "  cadfl run --set 'algorithms=[\"fedavg\",\"fedprox\"]' --set 'overrides={}' "
        "--set train.lr=0.02\n"
        "  cadfl run --set cad.others=true --set partition.other_fraction=0.3\n"
        "  cadfl run --set 'context=[{round=1, remove=[9]}, {round=10, devices=[0,1], add=[9]}]'"
        "\n"
        "  cadfl run --set dataset=synthetic --set devices=10000 --set sample=10\n"
        "  cadfl run configs/cifar10-alexnet-5cls.toml --set device=cuda --set batch_devices=10"
        "\n"
        "  cadfl run --resume runs/demo\n\n" + _algorithm_list())
    p.add_argument("config", nargs="?", metavar="CONFIG", help="TOML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting; dotted keys for sections, TOML values "
                   "(e.g. --set rounds=5 --set train.lr=0.01); repeatable")
    p.add_argument("--out", metavar="DIR", help="run directory (default: runs/NAME-TIMESTAMP)")
    p.add_argument("--resume", metavar="DIR",
                   help="continue the interrupted run in DIR with its own config.toml")
    p.add_argument("--data-dir", metavar="DIR",
                   help="folder holding datasets (e.g. DIR/cifar-10-batches-py); "
                   "default $CADFL_DATA, then ~/.cache/cadfl")
    p.add_argument("--quiet", action="store_true", help="no progress bars (for CI and logs)")
    p.add_argument("--engine", choices=("cadfl", "flower"), default="cadfl",
                   help="cadfl: in-process simulation (default); flower: the same run through "
                   "Flower's simulation engine, one SuperNode per device "
                   "(needs pip install 'cadfl[flower]'; see docs/flower.md)")
    p.add_argument("--flower-gpus", type=float, default=0.0, metavar="SHARE",
                   help="--engine flower: the share of a GPU each ClientApp gets (e.g. 0.25: "
                   "four per GPU); 0 (default) hides GPUs from the clients")
    _add_precision(p, None)
    p.set_defaults(handler=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from .config import DEMO, load_config
    from .engine.run import run_experiment
    from .report.summary import leaders, summarize, text_table

    if args.resume:
        if args.config or args.overrides or args.out or args.precision:
            raise UserError("--resume DIR continues a run with its own config.toml; "
                            "CONFIG, --set, --precision and --out cannot be combined with it")
        out = Path(args.resume)
        if not (out / "config.toml").exists():
            raise UserError(f"{out} is not a run directory (no config.toml)")
        # Where the data lives is not part of the experiment: --data-dir may point elsewhere.
        data_dir = [f"data_dir={json.dumps(args.data_dir)}"] if args.data_dir else []
        cfg = load_config(out / "config.toml", data_dir)
    else:
        overrides = _with_precision(args)
        if args.data_dir:
            overrides.append(f"data_dir={json.dumps(args.data_dir)}")
        cfg = load_config(args.config or DEMO, overrides)
        name = Path(args.config).stem if args.config else "demo"
        out = Path(args.out or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
        if (out / "metrics.jsonl").exists():
            raise UserError(f"{out} already holds a run: continue it with --resume {out}, "
                            "or choose another --out")
    if getattr(args, "engine", "cadfl") == "flower":
        import importlib.util

        if importlib.util.find_spec("flwr") is None:
            raise UserError("--engine flower needs Flower: pip install 'cadfl[flower]'")
        from .flower.simulation import run_flower_simulation

        if not 0 <= args.flower_gpus <= 1:
            raise UserError(f"--flower-gpus {args.flower_gpus}: allowed 0 to 1 (a GPU share)")
        lines = run_flower_simulation(cfg, out, quiet=args.quiet, resume=bool(args.resume),
                                      gpus_per_client=args.flower_gpus)
    else:
        lines = run_experiment(cfg, out, resume=bool(args.resume), quiet=args.quiet)
    rows = summarize(lines, cfg.target_acc, cfg.sampled_per_round())
    print(text_table(rows))
    print("\nwho leads:\n" + leaders(rows))
    print(f"\nrun directory: {out}  (summary.md, curves.png, metrics.jsonl)")
    return 0


def _add_visualize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "visualize", help="draw what a layer's filters respond to (activation maximisation)",
        description="Activation maximisation: from random noise, gradient ascent on each chosen "
        "filter's mean response, with a regulariser (L2 decay, Gaussian blur every few steps, "
        "random jitter, clipping to the data range). Writes one PNG grid per layer.",
        epilog="example: cadfl visualize runs/demo/checkpoints/fedavg.safetensors --layer conv3")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a run's checkpoints/NAME.safetensors (or its .json)")
    p.add_argument("--layer", required=True, help="conv or linear layer name, e.g. conv3")
    p.add_argument("--filters", type=int, nargs="+", metavar="F",
                   help="filter indices (default: the first 16)")
    p.add_argument("--steps", type=int, default=100, help="gradient-ascent steps (default 100)")
    p.add_argument("--eta", type=float, default=1.0, help="step size (default 1.0)")
    p.add_argument("--decay", type=float, default=0.01, help="L2 decay per step (default 0.01)")
    p.add_argument("--blur-every", type=int, default=4, help="blur every N steps (default 4)")
    p.add_argument("--blur-sigma", type=float, default=0.5, help="blur sigma px (default 0.5)")
    p.add_argument("--jitter", type=int, default=2, help="random shift, px (default 2)")
    p.add_argument("--data-dir", metavar="DIR", help="dataset folder (for normalisation)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: RUN/filters/NAME)")
    _add_model_compute(p)
    p.set_defaults(handler=_cmd_visualize)


def _cmd_visualize(args: argparse.Namespace) -> int:
    from .analysis.explain import visualize_command

    try:
        return visualize_command(args)
    except ValueError as exc:  # a layer or filter the model does not have
        raise UserError(str(exc)) from None


def _add_analyze(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze", help="class preferences, selectivity by depth, suggested depth, class paths",
        description="Per-class mean activation of every filter on labelled test images (the "
        "statistic CAD's activation assignment uses), a heatmap per layer, class selectivity "
        "against depth, the decoupling depth it suggests, and for a decoupled model (cad, "
        "fed2) the filters of each class path.",
        epilog="example: cadfl analyze runs/demo/checkpoints/cad.safetensors --class 3")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a run's checkpoints/NAME.safetensors (or its .json)")
    p.add_argument("--dataset", help="labelled data (default: the run's dataset)")
    p.add_argument("--data-dir", metavar="DIR", help="dataset folder")
    p.add_argument("--samples", type=int, default=2000,
                   help="test images used (default 2000)")
    p.add_argument("--threshold", type=float, default=0.3,
                   help="selectivity from which layers are decoupled (default 0.3)")
    p.add_argument("--class", dest="cls", type=int, default=0,
                   help="class whose critical path is drawn (default 0)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: RUN/analysis/NAME)")
    _add_model_compute(p)
    p.set_defaults(handler=_cmd_analyze)


def _cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis.explain import analyze_command

    try:
        return analyze_command(args)
    except ValueError as exc:  # e.g. a --device this machine does not have
        raise UserError(str(exc)) from None


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="a device's context model as one mobile inference file (ONNX), checked "
        "in onnxruntime",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export the context model of some classes as one standalone file: for a "
        "CAD (or Fed2)\ncheckpoint the physically smaller sub-model with only those classes' "
        "paths, for a dense\ncheckpoint (fedavg, fedprox, ...) the whole network with only "
        "those classes' logits.\n\n"
        "Input: uint8 images N x H x W x C (any batch size), normalised inside the file with "
        "the\nrun's dataset statistics. Output: one logit per class, in the order the file's "
        "metadata\nlists (classes, class_names), Others last with --others. The metadata also "
        "holds the\ncheckpoint's SHA-256 and the model spec.\n\n"
        "Before it is written, the file is run (ONNX: in onnxruntime, CPU; TorchScript: by "
        "torch.jit)\non test images of the classes and on random images; its logits must equal "
        "PyTorch's within\na relative 1e-4, else nothing is written. ONNX, --int8 and --report "
        "need\npip install 'cadfl[mobile]'. See docs/mobile.md.",
        epilog="examples:\n"
        "  cadfl export runs/demo/checkpoints/cad.safetensors --classes 3 5 --out digits-3-5.onnx\n"
        "  cadfl export RUN/checkpoints/cad.safetensors --classes 3 5 --others --int8 --report "
        "--out ctx.onnx\n"
        "  cadfl export RUN/checkpoints/fedavg.safetensors --classes 3 5 --out dense-3-5.onnx\n"
        "  cadfl export RUN/checkpoints/cad.safetensors --classes 1 --format torchscript "
        "--out one.pt\n"
        "  cadfl export RUN/checkpoints/cad.safetensors --classes 3 5 --trainable --report "
        "--out train-3-5.pte")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a run's checkpoints/NAME.safetensors (or its .json); RUN/config.toml "
                   "names the dataset")
    p.add_argument("--classes", type=int, nargs="+", required=True, metavar="C",
                   help="class ids of the context, in the order of the logits")
    p.add_argument("--others", action="store_true",
                   help="add the Others logit (\"none of my classes\"; models trained with "
                   "cad.others = true)")
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx",
                   help="onnx (default; checked in onnxruntime) or torchscript (PyTorch Mobile "
                   "/ libtorch; checked by torch.jit.load)")
    p.add_argument("--int8", action="store_true",
                   help="write an int8 file: onnxruntime static post-training quantisation, "
                   "calibrated on training images of the classes; prints its accuracy against "
                   "float")
    p.add_argument("--calibration", type=int, default=300, metavar="N",
                   help="training images of the classes used to calibrate --int8 (default 300)")
    p.add_argument("--report", nargs="?", const="", metavar="JSON",
                   help="also export the full model and print and write (to JSON, default "
                   "OUT with .report.json) file size, parameters, multiply-adds per image, "
                   "onnxruntime latency per image (batch 1, one thread) and context accuracy "
                   "of both, float and with --int8 also int8")
    p.add_argument("--repeats", type=int, default=200, metavar="N",
                   help="--report latency: the median of N runs of each file, the files "
                   "taking turns (default 200)")
    p.add_argument("--test-images", type=int, default=1000, metavar="N",
                   help="test images of the classes used for the check and for accuracy "
                   "(a seeded draw; default 1000)")
    p.add_argument("--trainable", action="store_true",
                   help="write an on-device training program instead (ExecuTorch .pte, with "
                   "FILE.json beside it): forward, restricted loss and gradients of one step, "
                   "batch norm in training mode; the app runs ExecuTorch's SGD on its "
                   "gradients. Checked by --check-steps SGD steps in ExecuTorch's runtime "
                   "against PyTorch's; --report adds program bytes, peak memory and step "
                   "latency against the full model. Needs pip install 'cadfl[train-mobile]'")
    p.add_argument("--batch-size", type=int, metavar="B",
                   help="--trainable: the largest batch the program takes (default: the run's "
                   "train.batch_size)")
    p.add_argument("--check-steps", type=int, default=5, metavar="K",
                   help="--trainable: SGD steps compared with PyTorch's (default 5)")
    p.add_argument("--data-dir", metavar="DIR", help="dataset folder (default: the run's)")
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write")
    p.set_defaults(handler=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from .export.command import export_command
    from .export.model import ExportError

    for name in ("calibration", "repeats", "test_images", "check_steps", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    try:
        return export_command(args)
    except ExportError as exc:
        raise UserError(str(exc)) from None


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep", help="tune every algorithm on validation data; writes a tuned config",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run every algorithm of a config at every point of a grid of settings, "
        "score each on validation data only (validation_fraction of every device's images "
        "held out; default 0.1), and write the best settings per algorithm as a config with "
        "[overrides.NAME] tables that cadfl run takes as it is. Personalised algorithms are "
        "judged by context accuracy, the rest by the mean of global and context accuracy, "
        "each over its last 3 evaluations. The test set is never looked at. Writes "
        "sweep.md, sweep.json, heatmap.png, tuned.toml and one run directory per point; "
        "run it again with the same --out to continue an interrupted sweep.",
        epilog="examples:\n"
        "  cadfl sweep --grid train.lr=0.01,0.03,0.1            # over the config's rounds\n"
        "  cadfl sweep configs/cifar10-alexnet-5cls.toml --set data_fraction=0.1 "
        "--grid train.lr=0.005,0.01,0.02 --grid fedprox.mu=0.01,0.1 --rounds 10\n"
        "  cadfl run runs/sweep/tuned.toml")
    p.add_argument("config", nargs="?", metavar="CONFIG", help="TOML config file")
    p.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2,...",
                   help="a setting and its values (TOML); repeat for a product grid")
    p.add_argument("--rounds", type=int, help="rounds of every point (default: the config's "
                   "rounds, the horizon of the runs it tunes; a clearly lost point stops early)")
    p.add_argument("--extend", type=int, default=2, metavar="N",
                   help="a one-key grid of floats (the learning rate) grows past an end an "
                   "algorithm chose, one geometric step at a time, at most N values per end "
                   "(default 2; 0: the grid as given)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting of CONFIG for every run (as for cadfl run)")
    p.add_argument("--out", metavar="DIR", help="sweep folder (default: runs/sweep-TIMESTAMP)")
    _add_precision(p, None)
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(handler=_cmd_sweep)


def _cmd_sweep(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from .config import DEMO, load_config
    from .sweep import parse_grid, print_table, run_sweep

    if args.rounds is not None and args.rounds < 1:
        raise UserError(f"--rounds {args.rounds}: give at least 1")
    if args.extend < 0:
        raise UserError(f"--extend {args.extend}: give 0 or more")
    out = Path(args.out or f"runs/sweep-{time.strftime('%Y%m%d-%H%M%S')}")
    overrides = _with_precision(args)
    config = args.config or str(DEMO)
    rounds = args.rounds or load_config(config, overrides).rounds
    result = run_sweep(config, overrides, parse_grid(args.grid), rounds, out,
                       quiet=args.quiet, extend=args.extend)
    print_table(result)
    print(f"\nsweep folder: {out}  (sweep.md, heatmap.png; tuned config: {out / 'tuned.toml'})")
    return 0


def _user_errors() -> tuple[type[Exception], ...]:
    """Exceptions that report a user's mistake: shown as one message, no traceback."""
    from .config import ConfigError
    from .data.datasets import DataError
    from .data.partition import PartitionError
    from .engine.checkpoint import CheckpointError
    from .models import SpecError

    return (UserError, SpecError, DataError, PartitionError, ConfigError, CheckpointError)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (sub-commands registered here, implemented in the library)."""
    parser = argparse.ArgumentParser(
        prog="cadfl",
        description="Context-aware distributed learning (CAD) of CNNs across mobile devices: "
        "simulate CAD against FedAvg and friends, profile models, and look inside them.")
    parser.add_argument("--version", action="version", version=f"cadfl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_profile(sub)
    _add_run(sub)
    _add_sweep(sub)
    _add_visualize(sub)
    _add_analyze(sub)
    _add_export(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `cadfl` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except _user_errors() as exc:
        print(f"cadfl {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
