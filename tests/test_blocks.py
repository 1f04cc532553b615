"""Residual and inverted-residual blocks: the zoo's ResNet-18 and MobileNetV2 by hand, the
blocks against functional references, CAD's class paths through them, and width slices."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cadfl.cad.decouple import decouple
from cadfl.cad.submodel import extract
from cadfl.config import ConfigError, load_config
from cadfl.engine.run import run_experiment
from cadfl.fl.aggregate import Contribution, aggregate
from cadfl.fl.width import channel_window, slice_state, width_maps
from cadfl.models import SpecError, build_model, get_model
from cadfl.models.spec import ModelSpec, spec_from_config

# stem conv 2->4, a projecting block to 6 channels at stride 2, an identity block, norm, pool
TINY_RES = spec_from_config("tiny_res", [("conv", 4), ("res", 6, 2), ("res", 6, 1), "N", "A"],
                            (2, 8, 8), 3)
# stem conv 2->6 (bn, relu6), a non-residual expanding block to 6 at stride 2, an identity one
TINY_INV = spec_from_config("tiny_inv", [6, ("inv", 2, 6, 2), ("inv", 3, 6, 1), "A"],
                            (2, 8, 8), 3, batch_norm=True, act="relu6")


def _randomise_bn(model: torch.nn.Module) -> None:
    for m in model.modules():  # non-trivial batch-norm statistics and affine parameters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


def _bn(x: torch.Tensor, s: dict, prefix: str, rows=slice(None)) -> torch.Tensor:
    """Eval-mode batch norm with the statistics of `prefix`, channels `rows`, by hand."""
    mean, var = s[f"{prefix}.running_mean"][rows], s[f"{prefix}.running_var"][rows]
    w, b = s[f"{prefix}.weight"][rows], s[f"{prefix}.bias"][rows]
    return ((x - mean[:, None, None]) / torch.sqrt(var[:, None, None] + 1e-5)
            * w[:, None, None] + b[:, None, None])


def test_resnet18_parameter_count_by_hand() -> None:
    # stem 3x3 3->64; per block bn1 (2 per input channel), two 3x3 convs, bn2, and a 1x1
    # projection where the shape changes; final bn 512; fc 512->10.
    expected, c_in = 3 * 64 * 9, 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for i in range(2):
            expected += 2 * c_in + c_in * c_out * 9 + 2 * c_out + c_out * c_out * 9
            if i == 0 and (stride != 1 or c_in != c_out):
                expected += c_in * c_out
            c_in = c_out
    expected += 2 * 512 + 512 * 10 + 10
    assert expected == 11_172_170  # HeteroFL reports 11.2M for its ResNet-18 at rate 1
    model = build_model(get_model("resnet18"))
    assert sum(p.numel() for p in model.parameters()) == expected


def test_mobilenet_v2_parameter_count_by_hand() -> None:
    # stem 3x3 3->32 + bn; per block: [1x1 expand + bn] + 3x3 depthwise + bn + 1x1 project
    # + bn; 1x1 conv 320->1280 + bn; fc 1280->10.
    stages = ((1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3),
              (6, 320, 1))
    expected, c_in = 3 * 32 * 9 + 2 * 32, 32
    for t, c, n in stages:
        for _ in range(n):
            h = c_in * t
            expand = c_in * h + 2 * h if t != 1 else 0
            expected += expand + h * 9 + 2 * h + h * c + 2 * c
            c_in = c
    expected += 320 * 1280 + 2 * 1280 + 1280 * 10 + 10
    model = build_model(get_model("mobilenet_v2"))
    assert sum(p.numel() for p in model.parameters()) == expected
    # 17 blocks, residual where stride 1 and channels agree: 10 of them (torchvision's rule)
    blocks = [layer for layer in get_model("mobilenet_v2").layers if layer.kind == "inverted"]
    assert len(blocks) == 17 and sum(b.skip == "identity" for b in blocks) == 10


def test_mobilenet_v2_width_multiplier_rounds_channels_to_multiples_of_eight() -> None:
    half = get_model("mobilenet_v2", width=0.5)
    widths = [layer.out_ch for layer in half.layers if layer.kind in ("conv", "inverted")]
    assert all(w % 8 == 0 for w in widths)
    # torchvision at 0.5: 16 stem, 8 first block (16 * 0.5), and the last conv stays 1280
    assert widths[:2] == [16, 8] and widths[-1] == 1280
    with pytest.raises(SpecError, match="no width multiplier"):
        get_model("alexnet", width=0.5)
    with pytest.raises(ConfigError, match="width"):
        load_config(None, ['model="resnet18"', "width=0.5"])


def _seeded(spec: ModelSpec, seed: int) -> tuple[torch.nn.Module, dict, torch.Tensor]:
    """`spec`'s model in eval mode with seeded weights and batch norms, its state and inputs."""
    torch.manual_seed(seed)
    model = build_model(spec).eval()
    _randomise_bn(model)
    return model, model.state_dict(), torch.randn(3, *spec.input_shape)


def test_preact_block_equals_its_functional_definition() -> None:
    model, s, x = _seeded(TINY_RES, 0)
    h0 = F.conv2d(x, s["conv1.weight"], padding=1)
    a = F.relu(_bn(h0, s, "block1.bn1"))
    skip = F.conv2d(a, s["block1.shortcut.weight"], stride=2)  # projection of the activation
    h = F.conv2d(a, s["block1.conv1.weight"], stride=2, padding=1)
    h1 = F.conv2d(F.relu(_bn(h, s, "block1.bn2")), s["block1.conv2.weight"], padding=1) + skip
    a = F.relu(_bn(h1, s, "block2.bn1"))
    h = F.conv2d(F.relu(_bn(F.conv2d(a, s["block2.conv1.weight"], padding=1), s, "block2.bn2")),
                 s["block2.conv2.weight"], padding=1)
    h2 = h + h1  # identity: the input itself, not its activation
    feat = F.relu(_bn(h2, s, "bn1")).mean((2, 3))
    expected = feat @ s["fc1.weight"].T + s["fc1.bias"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_inverted_block_equals_its_functional_definition() -> None:
    model, s, x = _seeded(TINY_INV, 1)
    h0 = F.relu6(_bn(F.conv2d(x, s["conv1.weight"], padding=1), s, "bn1"))

    def block(x, name, stride):
        h = F.relu6(_bn(F.conv2d(x, s[f"{name}.expand.weight"]), s, f"{name}.bn1"))
        dw = s[f"{name}.dw.weight"]
        h = F.relu6(_bn(F.conv2d(h, dw, stride=stride, padding=1, groups=dw.shape[0]), s,
                        f"{name}.bn2"))
        return _bn(F.conv2d(h, s[f"{name}.project.weight"]), s, f"{name}.bn3")

    h1 = block(h0, "block1", 2)  # 6 -> 6 at stride 2: no residual
    h2 = block(h1, "block2", 1) + h1
    expected = h2.mean((2, 3)) @ s["fc1.weight"].T + s["fc1.bias"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_resnet_class_path_is_its_own_small_network_written_by_hand() -> None:
    # Both blocks decoupled into 3 class paths of 2 channels: class c's logit must be the
    # network made of c's slices alone (the block's input norm reads the shared trunk).
    dec = decouple(TINY_RES, 3, 2)
    torch.manual_seed(2)
    full = build_model(dec.spec).eval()
    _randomise_bn(full)
    s = full.state_dict()
    x = torch.randn(4, 2, 8, 8)
    with torch.no_grad():
        logits = full(x)
    for c in range(3):
        r = slice(2 * c, 2 * c + 2)
        a = F.relu(_bn(F.conv2d(x, s["conv1.weight"], padding=1), s, "block1.bn1"))
        skip = F.conv2d(a, s["block1.shortcut.weight"][r], stride=2)
        h = F.conv2d(a, s["block1.conv1.weight"][r], stride=2, padding=1)
        h1 = F.conv2d(F.relu(_bn(h, s, "block1.bn2", r)), s["block1.conv2.weight"][r],
                      padding=1) + skip
        a = F.relu(_bn(h1, s, "block2.bn1", r))
        h = F.conv2d(a, s["block2.conv1.weight"][r], padding=1)
        h2 = F.conv2d(F.relu(_bn(h, s, "block2.bn2", r)), s["block2.conv2.weight"][r],
                      padding=1) + h1
        feat = F.relu(_bn(h2, s, "bn1", r)).mean((2, 3))
        expected = feat @ s["fc1.weight"][c] + s["fc1.bias"][c]
        torch.testing.assert_close(logits[:, c], expected, rtol=1e-5, atol=1e-5)
    sub_spec, sub_state, _ = extract(dec, s, [2, 0])
    sub = build_model(sub_spec).eval()
    sub.load_state_dict(sub_state)
    with torch.no_grad():
        assert torch.equal(sub(x), logits[:, [2, 0]])


@st.composite
def block_cases(draw):
    """A random small block model, a decoupling depth it allows, and a class subset."""
    k = draw(st.integers(2, 4))
    inverted = draw(st.booleans())
    width = draw(st.integers(1, 3)) * k
    stem = draw(st.integers(2, 8))
    config: list = [stem]
    channels = stem
    for _ in range(draw(st.integers(1, 3))):
        out = draw(st.sampled_from([channels, width]))
        stride = draw(st.sampled_from([1, 2]))
        config.append(("inv", draw(st.integers(1, 3)), out, stride) if inverted
                      else ("res", out, stride))
        channels = out
    spec = spec_from_config("random", [*config, "A"], (2, 8, 8), k, batch_norm=True)
    depths = []
    for depth in range(len(config) + 1):
        try:
            decouple(spec, k, depth)
            depths.append(depth)
        except SpecError:
            pass
    depth = draw(st.sampled_from(depths))
    classes = draw(st.lists(st.integers(0, k - 1), min_size=1, max_size=k, unique=True))
    return spec, k, depth, classes, draw(st.integers(0, 2**16))


@settings(max_examples=40, deadline=None)
@given(block_cases())
def test_block_submodel_logits_equal_the_full_models_and_merge_back_exactly(case) -> None:
    spec, k, depth, classes, seed = case
    dec = decouple(spec, k, depth)
    torch.manual_seed(seed)
    full = build_model(dec.spec).eval()
    _randomise_bn(full)
    state = full.state_dict()
    sub_spec, sub_state, rows = extract(dec, state, classes)
    sub = build_model(sub_spec).eval()
    sub.load_state_dict(sub_state)
    x = torch.randn(3, *spec.input_shape)
    with torch.no_grad():
        torch.testing.assert_close(sub(x), full(x)[:, classes], rtol=1e-5, atol=1e-5)
    merged = aggregate(state, [Contribution(sub_state, 3.0, rows)])
    assert all(torch.equal(merged[key], state[key]) for key in state)


def test_an_identity_block_cannot_start_the_class_paths() -> None:
    with pytest.raises(SpecError, match="block8: its identity skip"):
        decouple(get_model("resnet18"), 10, 1)  # block 8 adds the shared trunk to its output
    assert decouple(get_model("resnet18"), 10, 2).first == get_model("resnet18").names.index(
        "block7")


def test_width_slice_of_a_block_keeps_the_same_channels_in_its_residual_sum() -> None:
    spec = TINY_RES
    sub, rows, cols = width_maps(spec, channel_window(spec, 0.5, offset=1))
    # By hand: stem 4 -> window [1, 2]; blocks 6 -> window [1, 2, 3] at offset 1.
    assert rows["conv1.weight"].tolist() == [1, 2]
    assert rows["block1.bn1.weight"].tolist() == [1, 2]
    assert cols["block1.conv1.weight"].tolist() == [1, 2]
    assert cols["block1.shortcut.weight"].tolist() == [1, 2]
    assert rows["block1.conv2.weight"].tolist() == cols["block1.conv2.weight"].tolist() == [1, 2,
                                                                                            3]
    assert rows["block2.bn1.weight"].tolist() == [1, 2, 3]
    assert cols["fc1.weight"].tolist() == [1, 2, 3] and "fc1.weight" not in rows
    torch.manual_seed(3)
    state = build_model(spec).state_dict()
    part = slice_state(state, rows, cols)
    model = build_model(sub)
    model.load_state_dict(part)  # shapes agree with the narrower spec
    merged = aggregate(state, [Contribution(part, 1.0, rows=rows, cols=cols)])
    assert all(torch.equal(merged[key], state[key]) for key in state)


PEERS = ["cad", "fedavg", "fedrolex", "fedrep", "fed2"]


def _one_round(tmp_path, model: str, width: float, algorithms: list[str]) -> dict[str, dict]:
    # 8x8 digits through the CIFAR models (their strides leave 1x1); one round each.
    cfg = load_config(None, [f'model="{model}"', f"width={width}", "devices=4", "rounds=1",
                             "data_fraction=0.2", "cad.depth=2", "fed2.depth=2",
                             "fedrolex.depth=2", f"algorithms={algorithms}".replace("'", '"')])
    lines = run_experiment(cfg, tmp_path / model, quiet=True)
    by = {line["algorithm"]: line for line in lines}
    assert set(by) == set(algorithms)
    assert all(0.0 <= line["context_acc"] <= 1.0 and line["train_loss"] > 0 for line in lines)
    assert by["cad"]["bytes_down"] < by["fedavg"]["bytes_down"]
    return by


def test_cad_and_peers_train_a_narrow_mobilenet_v2(tmp_path) -> None:
    _one_round(tmp_path, "mobilenet_v2", 0.25, ["cad", "fedavg", "fedrep"])


@pytest.mark.slow  # about a minute on 2 cores: FedRolex's auto rate counts many FLOPs
@pytest.mark.parametrize("model", ["resnet18", "mobilenet_v2"])
def test_peers_and_cad_run_on_block_models_without_special_cases(tmp_path, model) -> None:
    _one_round(tmp_path, model, 1.0 if model == "resnet18" else 0.5, PEERS)


def test_block_models_round_trip_through_json() -> None:
    for name in ("resnet18", "mobilenet_v2"):
        spec = decouple(get_model(name), 10, 2).spec
        assert ModelSpec.from_dict(spec.to_dict()) == spec


def test_cad_path_lr_scales_a_blocks_path_tensors_but_not_its_shared_input_norm() -> None:
    from cadfl.fl.cad import CAD
    from cadfl.fl.payload import DeviceInfo, TrainConfig

    cad = CAD(TINY_RES, TrainConfig(), [DeviceInfo(0, (4, 4, 0))], depth=2, path_lr=3.0)
    scaled = {pattern for pattern, factor in cad.device_config(1, 0).lr_scales if factor == 3.0}
    # block1 reads the shared trunk: its input norm is the trunk's; everything else a path's
    assert "block1.bn1.weight" not in scaled and "conv1.weight" not in scaled
    assert {"block1.conv1.weight", "block1.shortcut.weight", "block1.bn2.weight",
            "block2.bn1.weight", "bn1.weight", "fc1.weight"} <= scaled


def test_keep_local_batch_norm_keeps_the_statistics_inside_a_blocks_paths_on_the_device() -> None:
    from cadfl.fl.cad import CAD
    from cadfl.fl.payload import DeviceInfo, TrainConfig, matches

    cad = CAD(TINY_RES, TrainConfig(), [DeviceInfo(0, (4, 4, 0))], bn="keep_local", depth=2)
    state = cad.initial_state(build_model(TINY_RES).state_dict())
    payload = dict(cad.configure_train(1, state, [0]))[0]
    stats = [k for k in payload.state if k.endswith(("running_mean", "running_var"))]
    assert "block2.bn2.running_mean" in stats  # inside a block, inside the class paths
    assert all(matches(k, payload.keep) for k in stats)
    assert not any(matches(k, payload.keep) for k in payload.state if k.endswith("weight"))
