"""`cadfl export --trainable`: a context sub-model as an on-device training program.

The program is an ExecuTorch `.pte` file: the joint forward and backward graph of one training
step, exported by `torch.export` (`_export_forward_backward`) and lowered to ExecuTorch's
portable kernels. One call takes a batch of uint8 images N x H x W x C (normalised inside the
graph, as the inference export does) and their labels as indices into the model's outputs
(`classes` of the metadata), and returns the loss, every gradient and every parameter. The loss
is the cross-entropy over the model's own outputs: for a CAD sub-model those are exactly the
device's classes, so the device trains on them only (the restricted loss). Batch norm runs in
training mode and updates its running statistics inside the program; the program also returns
them, so that they can go back to the cloud with the weights.

The optimizer step is not in the program: the phone app runs ExecuTorch's own SGD (momentum,
weight decay; `executorch.extension.training`'s `get_sgd_optimizer`, the C++
`training::optimizer::SGD` on a phone) on the named gradients, in the same small loop that draws
the batches. That keeps the program one graph that any optimizer can drive, and the learning
rate a plain number the app (or the round's config) can change without a new export.

Two runtime problems of ExecuTorch 1.5.1 are worked around here, each with its reproduction in
tests/test_trainable.py so that we notice when upstream fixes them:
- The portable kernel of `aten.max_pool2d_with_indices_backward` adds the gradients into an
  output buffer it never zeroes: the gradients of every layer below a max-pool are wrong from
  the first step, and grow with every call. The joint graph is decomposed (torch's own
  decomposition: a zeroed tensor and `scatter_add`) before lowering, so no such kernel runs.
  Training-mode batch norm (`_native_batch_norm_legit_functional`) has no kernel at all and is
  decomposed the same way.
- Mutable buffers start uninitialised unless a pass marks them: the running statistics are
  marked (`InitializedMutableBufferPass`), so that they start from the checkpoint's.
- `TrainingModule.forward_backward` slices the outputs at an index that counts the mutated
  batch-norm buffers, which the lowered program does not return: its gradients are shifted.
  `Trainer` slices by the parameter count instead.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..fl.payload import State, TrainConfig
from ..models import ModelSpec, build_loaded
from .model import ExportError, ExportModel, Inference

# The joint-graph operators lowered through torch's decompositions instead of their ExecuTorch
# kernels (see the module docstring).
DECOMPOSED = ("max_pool2d_with_indices_backward", "_native_batch_norm_legit_functional")

# Allowed |runtime - PyTorch in float64| on any weight or statistic after each checked step,
# relative to the tensor's largest magnitude (at least 1): float32 rounding in the runtime
# moves weights by ~1e-7 relative per step (measured: <= 4e-7 after 10 steps); a wrong
# gradient moves them by lr * |g|, orders of magnitude more (the max-pool kernel's: ~10).
TRAIN_TOLERANCE = 1e-5

FQN_METHOD = "__et_training_fqn_forward"


def require_executorch() -> None:
    """Fail with the extra to install when ExecuTorch is missing."""
    if importlib.util.find_spec("executorch") is None:
        raise ExportError("a trainable export needs ExecuTorch: pip install 'cadfl[train-mobile]'")


class TrainStep(nn.Module):
    """uint8 images N x H x W x C and output-index labels -> (loss, batch-norm buffers): one
    training step's forward pass, the dataset's normalisation inside."""

    def __init__(self, net: nn.Module, mean: Any, std: Any) -> None:
        super().__init__()
        self.infer = Inference(net, mean, std)
        self.buffer_names = [k for k, _ in net.named_buffers()]

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The mean cross-entropy over the model's outputs, then the buffers after the step."""
        loss = F.cross_entropy(self.infer(images), labels)
        return (loss, *(b.clone() for b in self.infer.net.buffers()))


def training_step(spec: ModelSpec, state: State, mean: Any, std: Any,
                  dropout: bool = True) -> TrainStep:
    """The training step of network `spec` with weights `state` in PyTorch (train mode;
    dropout off when `dropout` is False, for a check that must draw no random masks)."""
    # ExecuTorch's portable kernels want one dim order per operator: all NCHW.
    net = build_loaded(spec, state).to(memory_format=torch.contiguous_format)
    net.train()
    if not dropout:
        for m in net.modules():
            if isinstance(m, nn.Dropout):
                m.eval()
    return TrainStep(net, mean, std)


def train_step(model: ExportModel, dropout: bool = True) -> TrainStep:
    """The export model's training step in PyTorch (see `training_step`)."""
    ds = model.source.dataset
    return training_step(model.spec, model.state, ds.mean, ds.std, dropout)


def training_program(model: ExportModel, batch_size: int, dropout: bool = True) -> bytes:
    """The ExecuTorch program (`.pte` bytes) of the export model's training step for batches
    of 1 to `batch_size` images (the runtime plans memory for the largest)."""
    return step_program(train_step(model, dropout), model.spec, batch_size)


def step_program(step: TrainStep, spec: ModelSpec, batch_size: int) -> bytes:
    """The ExecuTorch program of training step `step` of network `spec`, for batches of 1 to
    `batch_size` (at least 2) images."""
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass
    from torch._decomp import get_decompositions
    from torch.export.experimental import _export_forward_backward

    if batch_size < 2:  # torch.export specialises a dimension of size 1
        raise ExportError(f"a training program needs a batch size of at least 2, not "
                          f"{batch_size}")
    c, h, w = spec.input_shape
    example = (torch.zeros(batch_size, h, w, c, dtype=torch.uint8),
               torch.zeros(batch_size, dtype=torch.long))
    # The runtime leaves mutable buffers uninitialised unless told: the running statistics
    # would start from whatever the memory held, not from the checkpoint's.
    kept = InitializedMutableBufferPass(sorted({n.rsplit(".", 1)[-1] for n in step.buffer_names}))
    try:
        batch = torch.export.Dim("batch", min=1, max=batch_size)
        joint = _export_forward_backward(torch.export.export(
            step, example, dynamic_shapes=({0: batch}, {0: batch}), strict=True))
        joint = joint.run_decompositions(get_decompositions(
            [getattr(torch.ops.aten, op) for op in DECOMPOSED]))
        edge = to_edge(joint, compile_config=EdgeCompileConfig(_check_ir_validity=False))
        return edge.to_executorch(ExecutorchBackendConfig(passes=[kept])).buffer
    except Exception as err:  # torch.export and ExecuTorch raise many types; say which step
        raise ExportError(f"the joint (forward + backward) export of {spec.name} failed: "
                          f"{type(err).__name__}: {str(err).splitlines()[0]}") from err


class Trainer:
    """A training program in ExecuTorch's runtime with ExecuTorch's SGD: what a phone app runs.

    `step` trains on one batch; `state` reads the weights and statistics out by name (the
    model's state-dict names) and `write` writes weights in, after the first step (the runtime
    hands out its parameter tensors only then)."""

    def __init__(self, program: bytes, buffer_names: list[str], train: TrainConfig) -> None:
        from executorch.extension.training import _load_for_executorch_for_training_from_buffer

        self.program = program  # the runtime may read from these bytes: they must outlive it
        self.module = _load_for_executorch_for_training_from_buffer(program).model
        self.buffer_names, self.train = buffer_names, train
        self.names = [_own(k) for k in self.module.run_method(FQN_METHOD, ())]
        self.params: dict[str, torch.Tensor] | None = None
        self.buffers: dict[str, torch.Tensor] = {}
        self.optimizer: Any = None

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """One SGD step on uint8 images N x H x W x C with output-index labels; the loss."""
        from executorch.extension.training import get_sgd_optimizer

        out = self.module.run_method("forward", (images, labels), clone_outputs=False)
        n = len(self.names)
        user = len(out) - 2 * n  # loss and buffers; then the gradients, then the parameters
        grads = dict(zip(self.names, (g.clone() for g in out[user:user + n]), strict=True))
        if self.params is None:  # the runtime's own tensors: the optimizer updates them in place
            self.params = dict(zip(self.names, out[user + n:], strict=True))
            t = self.train
            self.optimizer = get_sgd_optimizer(self.params, t.lr, t.momentum, 0, t.weight_decay,
                                               False)
        self.optimizer.step(grads)
        self.buffers = dict(zip(self.buffer_names, (b.clone() for b in out[1:user]), strict=True))
        return float(out[0])

    def state(self) -> State:
        """The parameters and (after a step) the batch-norm buffers, by name, as copies."""
        if self.params is None:
            raise RuntimeError("the runtime hands out its parameters after the first step")
        return {**{k: v.clone() for k, v in self.params.items()}, **self.buffers}

    def write(self, weights: State) -> None:
        """Write parameters in by name (e.g. the next round's), into the runtime's tensors."""
        if self.params is None:
            raise RuntimeError("the runtime hands out its parameters after the first step")
        for k, v in weights.items():
            self.params[k].copy_(v)


def _own(name: str) -> str:
    """The model's state-dict name of a program's parameter (`infer.net.` prefix dropped)."""
    return name.removeprefix("infer.net.")


def pytorch_trainer(model: ExportModel, train: TrainConfig, dropout: bool = True,
                    dtype: torch.dtype = torch.float32
                    ) -> tuple[TrainStep, torch.optim.Optimizer]:
    """The same step in PyTorch (weights in `dtype`) with cadfl's device optimizer
    (`cadfl.device.train`)."""
    step = train_step(model, dropout).to(dtype)
    opt = torch.optim.SGD(step.parameters(), lr=train.lr, momentum=train.momentum,
                          weight_decay=train.weight_decay, foreach=True)
    return step, opt


def pytorch_step(step: TrainStep, opt: torch.optim.Optimizer, images: torch.Tensor,
                 labels: torch.Tensor) -> float:
    """One PyTorch SGD step; the loss."""
    loss = step(images, labels)[0]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, steps: int
            ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` batches of uint8 N x H x W x C images (from N x C x H x W) with their labels,
    cycling through the images in order."""
    nhwc = images.permute(0, 2, 3, 1).contiguous()
    idx = torch.arange(steps * batch_size) % len(labels)
    return [(nhwc[i], labels[i]) for i in idx.split(batch_size)]


def output_labels(model: ExportModel, labels: torch.Tensor) -> torch.Tensor:
    """Global class ids -> indices into the model's outputs."""
    lut = {c: i for i, c in enumerate(model.classes)}
    return torch.tensor([lut[int(c)] for c in labels])


def check_training(model: ExportModel, program: bytes, data: list[tuple[torch.Tensor,
                   torch.Tensor]], train: TrainConfig) -> dict[str, list[float]]:
    """Train the program in ExecuTorch and the model in PyTorch, in float64 and in float32,
    from the same start on the same batches; per reference, the largest relative difference
    of any weight or statistic after each step. ExportError at the first step where the
    runtime is further than TRAIN_TOLERANCE from the float64 reference.

    Float64 is the reference that decides: with images of few grey levels (digits) a max-pool
    window often holds exact ties, and PyTorch's float32 convolutions round equal patches
    differently, so its max-pool routes some gradients to another pixel of the window. Both
    are valid, but the float32 difference then grows with every step (1e-3 after 10 steps on
    digits), while the runtime stays within ~4e-7 of float64.
    """
    torch.manual_seed(0)
    refs = {"float64": pytorch_trainer(model, train, dropout=False, dtype=torch.float64),
            "float32": pytorch_trainer(model, train, dropout=False)}
    et = Trainer(program, refs["float32"][0].buffer_names, train)
    diffs: dict[str, list[float]] = {name: [] for name in refs}
    for k, (x, y) in enumerate(data, 1):
        et.step(x, y)
        got = et.state()
        for name, (ref, opt) in refs.items():
            pytorch_step(ref, opt, x, y)
            want = {_own(n): t.detach() for n, t in ref.infer.net.state_dict().items()}
            rel = {n: float((got[n].double() - want[n].double()).abs().max())
                   / max(1.0, float(want[n].double().abs().max())) for n in got}
            diffs[name].append(max(rel.values()))
            if name == "float64" and not diffs[name][-1] <= TRAIN_TOLERANCE:  # NaN too
                worst = max(rel, key=rel.get)
                raise ExportError(f"after step {k} the runtime's {worst} differs from "
                                  f"PyTorch's (float64) by {rel[worst]:.2e} (relative; "
                                  f"tolerance {TRAIN_TOLERANCE:.0e})")
    return diffs


def step_latency(programs: dict[str, tuple[ExportModel, bytes]],
                 data: dict[str, list[tuple[torch.Tensor, torch.Tensor]]], train: TrainConfig,
                 repeats: int, warmup: int = 3) -> dict[str, dict[str, float]]:
    """Median step latency in ms of each program in ExecuTorch and of its model in PyTorch
    (one thread) on its batches `data[name]`, measured side by side: all take turns in every
    repetition, so machine load hits all alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runners = {}
        for name, (model, program) in programs.items():
            ref, opt = pytorch_trainer(model, train)
            et = Trainer(program, ref.buffer_names, train)
            runners[(name, "executorch")] = et.step
            runners[(name, "pytorch")] = lambda x, y, r=ref, o=opt: pytorch_step(r, o, x, y)
        times: dict[tuple[str, str], list[float]] = {k: [] for k in runners}
        for i in range(warmup + repeats):
            for key, run in runners.items():
                batches_of = data[key[0]]
                x, y = batches_of[i % len(batches_of)]
                start = time.perf_counter()
                run(x, y)
                if i >= warmup:
                    times[key].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    out: dict[str, dict[str, float]] = {}
    for (name, runtime), t in times.items():
        out.setdefault(name, {})[runtime] = 1000 * statistics.median(t)
    return out


def _peak_of_one_step(program: Path, inputs: Path) -> None:
    """Child process: load the program, run one step, print the peak resident memory above
    the footprint before loading (Linux: VmHWM reset through clear_refs)."""
    torch.set_num_threads(1)
    from executorch.extension.training import _load_for_executorch_for_training_from_buffer

    x, y = torch.load(inputs)
    data = program.read_bytes()
    base = _reset_peak()
    module = _load_for_executorch_for_training_from_buffer(data).model
    module.run_method("forward", (x, y), clone_outputs=False)
    print(_vm("VmHWM") - base)


def _peak_of_one_pytorch_step(spec_state: Path, inputs: Path) -> None:
    """Child process: the same for a PyTorch step (model built, forward, backward, SGD)."""
    torch.set_num_threads(1)
    spec_dict, state, mean, std, train = torch.load(spec_state)

    x, y = torch.load(inputs)
    base = _reset_peak()
    net = build_loaded(ModelSpec.from_dict(spec_dict), state).train()
    step = TrainStep(net, mean, std)
    opt = torch.optim.SGD(step.parameters(), lr=train["lr"], momentum=train["momentum"],
                          weight_decay=train["weight_decay"], foreach=True)
    pytorch_step(step, opt, x, y)
    print(_vm("VmHWM") - base)


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def _reset_peak() -> int:
    """Reset the peak resident set to the current one; the current one, in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _vm("VmRSS")


def peak_memory(model: ExportModel, program: bytes, batch: tuple[torch.Tensor, torch.Tensor],
                train: TrainConfig) -> dict[str, int]:
    """Peak resident memory (bytes) of one training step in ExecuTorch and in PyTorch, each
    measured in a fresh process of its own (model loading included)."""
    if not Path("/proc/self/clear_refs").exists():
        raise ExportError("peak memory is measured through /proc (Linux only)")
    ds = model.source.dataset
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "program.pte").write_bytes(program)
        torch.save(batch, work / "inputs.pt")
        torch.save((model.spec.to_dict(), model.state, ds.mean, ds.std,
                    {"lr": train.lr, "momentum": train.momentum,
                     "weight_decay": train.weight_decay}), work / "model.pt")
        out = {}
        for runtime, fn, arg in (("executorch", "_peak_of_one_step", "program.pte"),
                                 ("pytorch", "_peak_of_one_pytorch_step", "model.pt")):
            code = (f"from cadfl.export.trainable import {fn}; from pathlib import Path; "
                    f"{fn}(Path({str(work / arg)!r}), Path({str(work / 'inputs.pt')!r}))")
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if done.returncode:
                raise ExportError(f"measuring the {runtime} step's memory failed: "
                                  f"{done.stderr.strip().splitlines()[-1]}")
            out[runtime] = int(done.stdout.strip().splitlines()[-1])
    return out


def measure_training(programs: dict[str, tuple[ExportModel, bytes]], images: torch.Tensor,
                     labels: torch.Tensor, batch_size: int, train: TrainConfig, repeats: int
                     ) -> dict[str, dict[str, Any]]:
    """Per program (e.g. "context", "full"), on the same uint8 images N x C x H x W of global
    class `labels`: program bytes, parameters, and one step's latency and peak memory in
    ExecuTorch and in PyTorch."""
    from ..models import count_params

    data = {name: batches(images, output_labels(model, labels), batch_size,
                          max(1, len(labels) // batch_size))
            for name, (model, _) in programs.items()}
    latency = step_latency(programs, data, train, repeats)
    rows = {}
    for name, (model, program) in programs.items():
        rows[name] = {"program_bytes": len(program), "params": count_params(model.spec),
                      "latency_ms": latency[name],
                      "peak_bytes": peak_memory(model, program, data[name][0], train)}
    return rows


def training_table(rows: dict[str, dict[str, Any]]) -> str:
    """The report's table: program MB, parameters, step latency and peak memory of each
    runtime, and the context program against the full one."""
    lines = [f"{'model':<8} {'program MB':>10} {'params':>11} {'ET step ms':>10} "
             f"{'PT step ms':>10} {'ET peak MB':>10} {'PT peak MB':>10}"]
    for name, r in rows.items():
        lines.append(f"{name:<8} {r['program_bytes'] / 1e6:>10.2f} {r['params']:>11,} "
                     f"{r['latency_ms']['executorch']:>10.2f} {r['latency_ms']['pytorch']:>10.2f} "
                     f"{r['peak_bytes']['executorch'] / 1e6:>10.1f} "
                     f"{r['peak_bytes']['pytorch'] / 1e6:>10.1f}")
    ctx, full = rows["context"], rows.get("full")
    if full:
        et = "executorch"
        lines.append(f"context / full in ExecuTorch: program "
                     f"{ctx['program_bytes'] / full['program_bytes']:.2f}x, step latency "
                     f"{ctx['latency_ms'][et] / full['latency_ms'][et]:.2f}x, peak memory "
                     f"{ctx['peak_bytes'][et] / full['peak_bytes'][et]:.2f}x")
    return "\n".join(lines)


def run_train_config(src: Any) -> TrainConfig:
    """The device training settings of the checkpoint's run (RUN/config.toml, with the
    algorithm's overrides), or the defaults when the run's config is not beside it."""
    from ..config import load_config

    config = src.path.parent.parent / "config.toml"
    if not config.exists():
        return TrainConfig()
    return load_config(config).for_algorithm(src.record.get("algorithm", "")).train


def metadata(model: ExportModel, batch_size: int, train: TrainConfig,
             buffer_names: list[str]) -> dict[str, Any]:
    """What the program's sidecar JSON says: the inference metadata, plus how to train it."""
    meta = {k: json.loads(v) for k, v in model.metadata().items()}
    meta.update({
        "program": "ExecuTorch training step: forward(images, labels) -> loss, batch-norm "
                   "buffers, gradients, parameters",
        "labels": "int64 N: the index of each image's class in `classes`",
        "batch_size": batch_size, "buffers": buffer_names,
        "optimizer": {"name": "sgd", "lr": train.lr, "momentum": train.momentum,
                      "weight_decay": train.weight_decay,
                      "where": "the app's loop: ExecuTorch's SGD on the named gradients"}})
    return meta
