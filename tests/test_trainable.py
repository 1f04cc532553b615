"""`cadfl export --trainable`: the on-device training program trains as cadfl's device does.

The reference for the program is cadfl's device step written out here (the model built from
the checkpoint, `to_float`, cross-entropy over the sub-model's outputs, torch's SGD with
momentum and weight decay), not the export's own PyTorch wrapper. The first tests reproduce
ExecuTorch's problems that the export works around: when one fails, upstream has fixed it and
the workaround can go.
"""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("executorch", reason="needs the train-mobile extra: "
                    "pip install 'cadfl[train-mobile]'")

from executorch.exir import EdgeCompileConfig, to_edge  # noqa: E402
from executorch.extension.training import (  # noqa: E402
    _load_for_executorch_for_training_from_buffer,
)
from torch._decomp import get_decompositions  # noqa: E402
from torch.export.experimental import _export_forward_backward  # noqa: E402

from cadfl.cli import main  # noqa: E402
from cadfl.config import load_config  # noqa: E402
from cadfl.data.augment import to_float  # noqa: E402
from cadfl.engine.run import run_experiment  # noqa: E402
from cadfl.export import model as xmodel  # noqa: E402
from cadfl.export import trainable  # noqa: E402
from cadfl.fl.payload import TrainConfig  # noqa: E402
from cadfl.models import build_loaded  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class PoolNet(nn.Module):
    """conv - (batch norm) - relu - max-pool - linear: the smallest net with the problems."""

    def __init__(self, bn: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return F.cross_entropy(self.fc(h.flatten(1)), y)


def lowered(net: nn.Module, example: tuple, decompose: bool) -> bytes:
    joint = _export_forward_backward(torch.export.export(net, example, strict=True))
    if decompose:
        joint = joint.run_decompositions(get_decompositions(
            [getattr(torch.ops.aten, op) for op in trainable.DECOMPOSED]))
    edge = to_edge(joint, compile_config=EdgeCompileConfig(_check_ir_validity=False))
    return edge.to_executorch().buffer


def test_upstream_max_pool_backward_kernel_still_accumulates_into_its_output():
    """ExecuTorch 1.5.1's max_pool2d_with_indices_backward gives wrong gradients below a
    max-pool, and our decomposition gives PyTorch's. If the first assert fails, upstream has
    fixed the kernel: `trainable.DECOMPOSED` can drop it."""
    torch.manual_seed(0)
    net = PoolNet(bn=False)
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 2])
    net(x, y).backward()
    want = net.conv.weight.grad
    grads = {}
    for decompose in (False, True):
        program = lowered(net, (x, y), decompose)  # the runtime reads these bytes: keep them
        module = _load_for_executorch_for_training_from_buffer(program)
        module.forward_backward("forward", (x, y))
        grads[decompose] = module.named_gradients()["conv.weight"]
    assert float((grads[False] - want).abs().max()) > 1.0
    assert torch.allclose(grads[True], want, atol=1e-6)


def test_upstream_forward_backward_still_slices_past_mutated_buffers():
    """With batch norm's running statistics mutated in the program, TrainingModule's
    gradients are shifted by the number of buffers (3): the conv bias gets a weight-shaped
    gradient. If this fails, upstream slices right and `Trainer` could use TrainingModule."""
    net = PoolNet(bn=True)
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 2])
    program = lowered(net, (x, y), True)
    module = _load_for_executorch_for_training_from_buffer(program)
    module.forward_backward("forward", (x, y))
    grads = module.named_gradients()
    assert grads["conv.bias"].shape != net.conv.bias.shape


@pytest.fixture(scope="module")
def exported(tmp_path_factory, digits) -> tuple[Path, Path]:
    """A one-round CAD run on digits and the trainable export of classes 3 and 5."""
    root = tmp_path_factory.mktemp("trainable")
    cfg = load_config(None, ["devices=4", "rounds=1", 'algorithms=["cad"]'])
    run_experiment(cfg, root / "run", quiet=True, dataset=digits)
    ckpt = root / "run" / "checkpoints" / "cad.safetensors"
    assert main(["export", str(ckpt), "--classes", "3", "5", "--trainable",
                 "--batch-size", "16", "--check-steps", "2",
                 "--out", str(root / "train-3-5.pte")]) == 0
    return ckpt, root / "train-3-5.pte"


@pytest.mark.slow  # a CAD run and an export: ~40 s, over make test's budget
def test_program_trains_step_for_step_as_the_device_does(exported, capsys):
    """Five SGD steps in ExecuTorch's runtime (the last a partial batch of 5 images) against
    cadfl's device step from the same start, in float64: every weight and running statistic
    after every step within the export's tolerance. The float32 step is measured beside it
    (it rounds the exact max-pool ties of digits' few grey levels its own way)."""
    ckpt, pte = exported
    src = xmodel.load_source(ckpt)
    model = xmodel.context_model(src, [3, 5])
    train = TrainConfig(lr=0.05, momentum=0.9, weight_decay=5e-4)
    ds = src.dataset
    x, y = xmodel.class_images(ds.train_x, ds.train_y, [3, 5], None)
    assert model.classes == (3, 5)
    y = (y == 5).long()  # index among the sub-model's outputs
    sizes = [16, 16, 16, 16, 5]
    nets = {dtype: build_loaded(model.spec, model.state).to(dtype).train()
            for dtype in (torch.float64, torch.float32)}
    opts = {dtype: torch.optim.SGD(net.parameters(), lr=train.lr, momentum=train.momentum,
                                   weight_decay=train.weight_decay)
            for dtype, net in nets.items()}
    et = trainable.Trainer(pte.read_bytes(),
                           [k for k, _ in nets[torch.float64].named_buffers()], train)
    worst, start = {dtype: 0.0 for dtype in nets}, 0
    for size in sizes:
        xb, yb = x[start:start + size], y[start:start + size]
        start += size
        et_loss = et.step(xb.permute(0, 2, 3, 1).contiguous(), yb)
        got = et.state()
        for dtype, net in nets.items():
            loss = F.cross_entropy(net(to_float(xb, ds.mean, ds.std).to(dtype)), yb)
            opts[dtype].zero_grad()
            loss.backward()
            opts[dtype].step()
            if dtype == torch.float64:
                assert abs(et_loss - float(loss)) <= 1e-5 * max(1.0, abs(float(loss)))
            assert set(got) == set(net.state_dict())
            for k, v in net.state_dict().items():
                scale = max(1.0, float(v.double().abs().max()))
                worst[dtype] = max(worst[dtype],
                                   float((got[k].double() - v.double()).abs().max()) / scale)
    assert worst[torch.float64] <= trainable.TRAIN_TOLERANCE
    with capsys.disabled():
        print(f"\nExecuTorch vs cadfl's device step, digits CAD sub-model of 2 classes, "
              f"{len(sizes)} steps: largest relative weight difference "
              f"{worst[torch.float64]:.1e} from float64, {worst[torch.float32]:.1e} from "
              "float32")


@pytest.mark.slow  # a CAD run and an export: ~40 s, over make test's budget
def test_weights_read_out_and_written_in_by_name(exported):
    ckpt, pte = exported
    model = xmodel.context_model(xmodel.load_source(ckpt), [3, 5])
    et = trainable.Trainer(pte.read_bytes(), trainable.train_step(model).buffer_names,
                           TrainConfig())
    with pytest.raises(RuntimeError, match="after the first step"):
        et.state()
    c, h, w = model.spec.input_shape
    et.step(torch.zeros(2, h, w, c, dtype=torch.uint8), torch.tensor([0, 1]))
    new = {k: torch.full_like(v, 0.25) for k, v in model.state.items()
           if v.is_floating_point() and "running" not in k}
    et.write(new)
    got = et.state()
    assert all(torch.equal(got[k], new[k]) for k in new)
    # Written in means trained from there: the next step starts at the new weights.
    et.step(torch.zeros(2, h, w, c, dtype=torch.uint8), torch.tensor([0, 1]))
    assert not torch.equal(et.state()["conv1.weight"], new["conv1.weight"])


@pytest.mark.slow  # a CAD run and an export: ~40 s, over make test's budget
def test_metadata_names_classes_spec_round_and_checkpoint(exported, capsys):
    ckpt, pte = exported
    meta = json.loads(pte.with_name(pte.name + ".json").read_text())
    record = json.loads(ckpt.with_suffix(".json").read_text())
    assert meta["classes"] == [3, 5] and meta["class_names"] == ["3", "5"]
    assert meta["round"] == 1 and meta["checkpoint_sha256"] == record["sha256"]
    assert meta["spec"] == xmodel.context_model(xmodel.load_source(ckpt), [3, 5]).spec.to_dict()
    assert meta["batch_size"] == 16 and meta["optimizer"]["momentum"] == 0.9
    assert all(".running_" in b or "num_batches" in b for b in meta["buffers"])


@pytest.mark.slow  # a CAD run and an export: ~40 s, over make test's budget
def test_bad_trainable_requests_fail_in_one_line(exported, tmp_path, capsys):
    ckpt, _ = exported
    out = tmp_path / "x.pte"
    assert main(["export", str(ckpt), "--classes", "3", "--trainable", "--int8",
                 "--out", str(out)]) != 0
    err = capsys.readouterr().err.strip()
    assert "--trainable" in err and len(err.splitlines()) == 1 and not out.exists()


def test_missing_extra_is_named(monkeypatch):
    real = trainable.importlib.util.find_spec
    monkeypatch.setattr(trainable.importlib.util, "find_spec",
                        lambda name, *a: None if name == "executorch" else real(name, *a))
    with pytest.raises(xmodel.ExportError, match=r"pip install 'cadfl\[train-mobile\]'"):
        trainable.require_executorch()


@pytest.mark.slow
def test_report_measures_both_runtimes_side_by_side(exported, tmp_path, capsys):
    ckpt, _ = exported
    out = tmp_path / "r.pte"
    assert main(["export", str(ckpt), "--classes", "3", "5", "--trainable", "--report",
                 "--repeats", "5", "--check-steps", "1", "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".report.json").read_text())["models"]
    for name in ("context", "full"):
        r = rows[name]
        assert r["program_bytes"] > 0 and r["latency_ms"]["executorch"] > 0
        assert r["peak_bytes"]["executorch"] > 0 and r["peak_bytes"]["pytorch"] > 0
    assert rows["context"]["params"] < rows["full"]["params"]
    assert rows["context"]["program_bytes"] < rows["full"]["program_bytes"]
