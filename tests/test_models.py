"""Model zoo and spec: shapes, parameter counts by hand, serialisation, errors, grouped layers."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from cadfl.models import (
    MODELS,
    GroupedLinear,
    Layer,
    ModelSpec,
    SpecError,
    build_model,
    get_model,
)

VGG16_CHANNELS = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]


def n_params(model: nn.Module) -> int:
    """Parameters of a built model, counted directly from its tensors."""
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("num_classes", [2, 10, 100])
def test_every_model_outputs_one_logit_per_class(name: str, num_classes: int) -> None:
    spec = get_model(name, num_classes=num_classes)
    assert spec.num_classes == num_classes
    with torch.no_grad():
        out = build_model(spec).eval()(torch.randn(2, *spec.input_shape))
    assert out.shape == (2, num_classes)


@pytest.mark.parametrize(("name", "shape"), [("lenet5", (1, 28, 28)), ("vgg11", (3, 64, 64)),
                                             ("alexnet", (1, 32, 32)),
                                             ("digits_cnn", (3, 16, 16))])
def test_non_default_input_shape(name: str, shape: tuple[int, int, int]) -> None:
    spec = get_model(name, num_classes=7, input_shape=shape)
    assert spec.input_shape == shape
    with torch.no_grad():
        out = build_model(spec).eval()(torch.randn(2, *shape))
    assert out.shape == (2, 7)


def test_vgg16_parameter_count_by_hand() -> None:
    # With batch norm: 3x3 conv weights without bias, BN weight + bias per channel,
    # after five pools 512x1x1 features into one linear layer 512 -> 10.
    expected, c_in = 0, 3
    for c_out in VGG16_CHANNELS:
        expected += c_in * c_out * 3 * 3 + 2 * c_out
        c_in = c_out
    expected += 512 * 10 + 10
    # 14,728,266 is the usual figure for this net *with* conv biases (sum of channels: 4,224).
    assert expected == 14_728_266 - sum(VGG16_CHANNELS)
    assert n_params(build_model(get_model("vgg16", num_classes=10))) == expected


def test_alexnet_parameter_count_by_hand() -> None:
    expected, c_in = 0, 3
    for c_out in [64, 192, 384, 256, 256]:  # 3x3 convs with bias, no batch norm
        expected += c_in * c_out * 3 * 3 + c_out
        c_in = c_out
    features = 256 * 4 * 4  # three pools: 32 -> 4
    for f_in, f_out in [(features, 1024), (1024, 1024), (1024, 10)]:
        expected += f_in * f_out + f_out
    assert n_params(build_model(get_model("alexnet", num_classes=10))) == expected


def test_fl_cnn_shapes_and_parameter_count_by_hand() -> None:
    # Unpadded 5x5 convs with bias: 32 -> 28 -> pool 14 -> 10 -> pool 5, so 64x5x5 = 1600
    # features into fc 512 and fc 10: 878,538 parameters with 3-channel input.
    expected = (3 * 32 * 25 + 32) + (32 * 64 * 25 + 64) + (1600 * 512 + 512) + (512 * 10 + 10)
    assert expected == 878_538
    spec = get_model("fl_cnn", num_classes=10)
    assert spec.names == ("conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "flatten",
                          "fc1", "relu3", "fc2")
    model = build_model(spec)
    assert n_params(model) == expected
    with torch.no_grad():
        features = model[:spec.names.index("flatten") + 1](torch.randn(2, 3, 32, 32))
    assert features.shape == (2, 1600)
    bn = get_model("fl_cnn", batch_norm=True)
    assert [layer.kind for layer in bn.layers].count("bn") == 2


def test_cnn64_is_fedreps_cifar_cnn_by_hand() -> None:
    # lgcollins/FedRep models/Nets.py CNNCifar: conv 3->64 5x5, pool, conv 64->64 5x5, pool,
    # fc 1600-120, fc 120-64, fc 64-10: 307,842 parameters.
    expected = ((3 * 64 * 25 + 64) + (64 * 64 * 25 + 64) + (1600 * 120 + 120)
                + (120 * 64 + 64) + (64 * 10 + 10))
    assert expected == 307_842
    spec = get_model("cnn64", num_classes=10)
    model = build_model(spec)
    assert n_params(model) == expected
    assert [layer.kind for layer in spec.layers if layer.kind in ("conv", "linear")] == \
        ["conv", "conv", "linear", "linear", "linear"]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_vgg16_without_batch_norm() -> None:
    spec = get_model("vgg16", batch_norm=False)
    assert not any(layer.kind == "bn" for layer in spec.layers)
    assert not any(name.startswith("bn") for name in spec.names)
    model = build_model(spec)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 and all(c.bias is not None for c in convs)
    # A conv bias (1 per channel) takes the place of BN's weight and bias (2 per channel).
    with_bn = n_params(build_model(get_model("vgg16")))
    assert n_params(model) == with_bn - sum(VGG16_CHANNELS)


def test_names_follow_the_layers() -> None:
    spec = get_model("lenet5")
    assert spec.names == ("conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "flatten",
                          "fc1", "relu3", "fc2", "relu4", "fc3")
    assert [name for name, _ in build_model(spec).named_children()] == list(spec.names)


@pytest.mark.parametrize("name", list(MODELS))
def test_spec_round_trip(name: str) -> None:
    spec = get_model(name, num_classes=5)
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_grouped_spec_round_trip() -> None:
    spec = ModelSpec("g", (4, 6, 6), (
        Layer("conv", 4, 8, kernel=3, padding=1, groups=(4, 4), grouped_in=True),
        Layer("flatten"), Layer("linear", 288, 3, groups=(1, 1, 1), grouped_in=True)),
        classes=(7, 2, 5))
    again = ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and again.layers[0].groups == (4, 4) and again.class_ids == (7, 2, 5)


def test_unknown_model_lists_the_valid_ones() -> None:
    with pytest.raises(SpecError) as info:
        get_model("resnet50")
    assert "resnet50" in str(info.value)
    assert all(name in str(info.value) for name in MODELS)


def test_mismatched_in_channels_names_the_layer() -> None:
    layers = (Layer("conv", 3, 8, kernel=3), Layer("relu"), Layer("conv", 5, 8, kernel=3),
              Layer("flatten"), Layer("linear", 8 * 4 * 4, 10))
    with pytest.raises(SpecError, match="conv2"):
        ModelSpec("bad", (3, 8, 8), layers)


def test_unknown_layer_field_is_an_error() -> None:
    with pytest.raises(SpecError, match="kernal"):
        Layer.from_dict({"kind": "conv", "kernal": 3})


@pytest.mark.parametrize("groups", [2, 3])
def test_grouped_linear_equals_block_diagonal_dense(groups: int) -> None:
    torch.manual_seed(0)
    g_in, g_out = 4, 5
    grouped = GroupedLinear(groups * g_in, groups * g_out, groups)
    dense = nn.Linear(groups * g_in, groups * g_out)
    with torch.no_grad():
        grouped.weight.normal_()
        grouped.bias.normal_()
        dense.weight.zero_()
        for g in range(groups):
            rows, cols = slice(g * g_out, (g + 1) * g_out), slice(g * g_in, (g + 1) * g_in)
            dense.weight[rows, cols] = grouped.weight[rows]
        dense.bias.copy_(grouped.bias)
    x = torch.randn(6, groups * g_in)
    torch.testing.assert_close(grouped(x), dense(x))


def test_grouped_linear_layer_builds_grouped_module() -> None:
    spec = ModelSpec("g", (6, 1, 1), (Layer("flatten"),
                                      Layer("linear", 6, 4, groups=(2, 2), grouped_in=True)))
    fc = build_model(spec).fc1
    assert isinstance(fc, GroupedLinear) and fc.groups == 2 and fc.weight.shape == (4, 3)


def test_grouped_conv_layer_builds_grouped_conv() -> None:
    spec = ModelSpec("g", (6, 8, 8), (
        Layer("conv", 6, 8, kernel=3, padding=1, groups=(4, 4), grouped_in=True),
        Layer("flatten"), Layer("linear", 8 * 8 * 8, 2)))
    model = build_model(spec)
    conv = model.conv1
    assert isinstance(conv, nn.Conv2d) and conv.groups == 2
    assert conv.weight.shape == (8, 3, 3, 3)
    # Output group 0 (channels 0-3) must not see input group 1 (channels 3-5).
    x = torch.randn(1, 6, 8, 8)
    y = x.clone()
    y[:, 3:] = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(conv(x)[:, :4], conv(y)[:, :4])
        assert not torch.allclose(conv(x)[:, 4:], conv(y)[:, 4:])
