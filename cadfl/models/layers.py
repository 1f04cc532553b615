"""Layer kinds: everything cadfl knows about one kind of layer, in one class each.

A `Layer` (`cadfl.models.spec`) is plain data with a `kind`; `KINDS[kind]` says how to name it,
check its shapes, build its module, and how CAD splits it into class paths. Adding a kind means
adding one class here and one line to `KINDS`.

Class paths (`cadfl.cad`): a layer with channel `groups` has its output channels in contiguous
runs, one per path; with `grouped_in` each run reads only the matching run of its input (block
diagonal weights, i.e. grouped convolutions). Every state tensor of a split layer is then a set
of rows (dim 0), each row owned by one path, or a tensor the paths share: `rows_per_group`
says which, per parameter.

Two kinds are blocks of several convolutions, so residual networks can be described:
- `resblock`: the pre-activation basic block of He et al. 2016 ("Identity mappings in deep
  residual networks"), as in HeteroFL's and FedRolex's ResNet-18 (`Block` in
  dem123456789/HeteroFL-...: models/resnet.py): bn1 - relu - conv1 3x3 (stride) - bn2 - relu -
  conv2 3x3, plus the input (`skip="identity"`) or a 1x1 projection of the activated input
  (`skip="conv"`) where the shape changes.
- `inverted`: MobileNetV2's inverted residual (Sandler et al. 2018; torchvision's
  `InvertedResidual`): 1x1 expand to `hidden` channels (left out when `expand` is 1) - bn -
  ReLU6 - 3x3 depthwise (stride) - bn - ReLU6 - 1x1 project - bn, plus the input when
  `skip="identity"` (stride 1 and as many channels out as in).

Inside a split block every path has its own slice of every convolution: each path's residual
sum adds only its own channels, a projection shortcut is split per path like the convs, and a
depthwise convolution is per channel anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .spec import Layer

Shape = tuple[int, ...]
Fail = Callable[[str], Exception]
Index = torch.Tensor | None
Maps = dict[str, torch.Tensor]
BN_PARAMS = ("weight", "bias", "running_mean", "running_var")


def _width(layer: Layer, current: Index, kept: Index) -> Layer:
    return replace(layer, in_ch=layer.in_ch if current is None else len(current),
                   out_ch=layer.out_ch if kept is None else len(kept))


def _put(maps: Maps, params: tuple[str, ...], index: Index) -> None:
    if index is not None:
        maps.update(dict.fromkeys(params, index))


class Kind:
    """The behaviour of one layer kind. Subclasses override what differs from a
    parameter-free layer that keeps its input's shape."""

    prefix = ""  # module names are prefix + a count (conv1, bn2, ...)
    weighted = False  # owns a bank of filters (conv, linear, blocks): heads, width, depth
    unit = False  # a feature stage counted by cad.depth from the end (conv layers, blocks)
    splittable = False  # may carry class-path channel groups
    free = False  # its output aliases its input (no activation memory, no energy)
    family = ""  # "conv" or "fc": which share of a model's cost it counts in (profile)
    activation = False  # a ReLU-like activation (class preferences are measured after it)

    def shape(self, layer: Layer, shape: Shape, fail: Fail) -> Shape:
        """Output shape (without batch) for an input of `shape`; raise `fail(msg)` if wrong."""
        return shape

    def module(self, layer: Layer) -> nn.Module:
        """The PyTorch module of `layer`."""
        raise NotImplementedError

    def split(self, layer: Layer, in_ch: int, groups: tuple[int, ...], grouped_in: bool,
              fail: Fail) -> Layer:
        """The layer with output channel `groups` (class paths) reading `in_ch` channels,
        each group only its own input group if `grouped_in`."""
        return replace(layer, in_ch=in_ch, out_ch=sum(groups), groups=groups,
                       grouped_in=grouped_in)

    def narrow(self, layer: Layer, total: int, groups: tuple[int, ...]) -> Layer:
        """The split layer of `total` groups keeping `groups` (sizes) of them."""
        in_ch = layer.in_ch // total * len(groups) if layer.grouped_in else layer.in_ch
        return replace(layer, in_ch=in_ch, out_ch=sum(groups), groups=groups)

    def rows_per_group(self, layer: Layer, param: str) -> int | None:
        """Rows of each path in the state tensor `param` (e.g. 'weight', 'conv1.weight') of
        a split layer, or None if the paths share it whole."""
        return layer.out_ch // len(layer.groups)

    def slice_width(self, layer: Layer, current: Index, kept: Index, hidden: Index,
                    fail: Fail) -> tuple[Layer, Maps, Maps]:
        """Width scaling (HeteroFL, FedRolex) of a dense layer: the layer reading input
        channels `current` and keeping output channels `kept` (and hidden channels `hidden`
        of a block), and per parameter the rows (dim 0) and columns (dim 1) of its tensors
        that it holds. None keeps every channel."""
        return layer, {}, {}


def _out_hw(layer: Layer, shape: Shape, fail: Fail, kernel: int) -> tuple[int, int]:
    if len(shape) != 3:
        raise fail("expects a (C, H, W) input")
    _, h, w = shape
    h2 = (h + 2 * layer.padding - kernel) // layer.stride + 1
    w2 = (w + 2 * layer.padding - kernel) // layer.stride + 1
    if h2 < 1 or w2 < 1 or kernel < 1:
        raise fail(f"kernel {kernel} stride {layer.stride} leaves no output")
    return h2, w2


def _check_in(layer: Layer, shape: Shape, fail: Fail) -> None:
    if len(shape) != 3:
        raise fail("expects a (C, H, W) input")
    if layer.in_ch != shape[0]:
        raise fail(f"in_ch={layer.in_ch} but the input has {shape[0]} channels")


def _path_groups(layer: Layer) -> tuple[int, int]:
    """Conv groups of a split layer's input side and output side (1 for a dense layer)."""
    n = len(layer.groups) if layer.groups is not None else 1
    return (n if layer.grouped_in else 1), n


def _slice_filters(layer: Layer, current: Index, kept: Index) -> tuple[Layer, Maps, Maps]:
    """A conv or linear layer's width slice: weight rows and bias of `kept`, weight columns
    of `current`."""
    rows: Maps = {}
    cols: Maps = {}
    _put(rows, ("weight", "bias") if layer.bias else ("weight",), kept)
    _put(cols, ("weight",), current)
    return _width(layer, current, kept), rows, cols


class Conv(Kind):
    prefix, weighted, unit, splittable, family = "conv", True, True, True, "conv"

    def slice_width(self, layer: Layer, current: Index, kept: Index, hidden: Index,
                    fail: Fail) -> tuple[Layer, Maps, Maps]:
        return _slice_filters(layer, current, kept)

    def shape(self, layer: Layer, shape: Shape, fail: Fail) -> Shape:
        _check_in(layer, shape, fail)
        return (layer.out_ch, *_out_hw(layer, shape, fail, layer.kernel))

    def module(self, layer: Layer) -> nn.Module:
        return nn.Conv2d(layer.in_ch, layer.out_ch, layer.kernel, layer.stride, layer.padding,
                         groups=_path_groups(layer)[0], bias=layer.bias)


class Linear(Kind):
    prefix, weighted, splittable, family = "fc", True, True, "fc"

    def slice_width(self, layer: Layer, current: Index, kept: Index, hidden: Index,
                    fail: Fail) -> tuple[Layer, Maps, Maps]:
        return _slice_filters(layer, current, kept)

    def shape(self, layer: Layer, shape: Shape, fail: Fail) -> Shape:
        if len(shape) != 1:
            raise fail("linear layer needs a flat input: add a flatten layer")
        if layer.in_ch != shape[0]:
            raise fail(f"in_ch={layer.in_ch} but the input has {shape[0]} features")
        return (layer.out_ch,)

    def module(self, layer: Layer) -> nn.Module:
        from .spec import GroupedLinear

        g = _path_groups(layer)[0]
        if g > 1:
            return GroupedLinear(layer.in_ch, layer.out_ch, g, bias=layer.bias,
                                 sizes=layer.groups)
        return nn.Linear(layer.in_ch, layer.out_ch, bias=layer.bias)


class BatchNorm(Kind):
    prefix, splittable = "bn", True

    def shape(self, layer: Layer, shape: Shape, fail: Fail) -> Shape:
        if len(shape) != 3:
            raise fail("expects a (C, H, W) input")
        if layer.out_ch != shape[0] or layer.in_ch != shape[0]:
            raise fail(f"bn channels {layer.out_ch} != input channels {shape[0]}")
        return shape

    def module(self, layer: Layer) -> nn.Module:
        return nn.BatchNorm2d(layer.out_ch)

    def split(self, layer: Layer, in_ch: int, groups: tuple[int, ...], grouped_in: bool,
              fail: Fail) -> Layer:
        return replace(layer, in_ch=in_ch, out_ch=in_ch, groups=(in_ch // len(groups),) *
                       len(groups))

    def narrow(self, layer: Layer, total: int, groups: tuple[int, ...]) -> Layer:
        return replace(layer, in_ch=sum(groups), out_ch=sum(groups), groups=groups)

    def slice_width(self, layer: Layer, current: Index, kept: Index, hidden: Index,
                    fail: Fail) -> tuple[Layer, Maps, Maps]:
        rows: Maps = {}
        _put(rows, BN_PARAMS, current)
        return _width(layer, current, current), rows, {}


class ReLU(Kind):
    prefix, activation = "relu", True

    def module(self, layer: Layer) -> nn.Module:
        return nn.ReLU()


class ReLU6(Kind):
    prefix, activation = "relu", True

    def module(self, layer: Layer) -> nn.Module:
        return nn.ReLU6()


class MaxPool(Kind):
    prefix = "pool"

    def shape(self, layer: Layer, shape: Shape, fail: Fail) -> Shape:
        h, w = _out_hw(layer, shape, fail, layer.kernel)
        return (shape[0], h, w)

    def module(self, layer: Layer) -> nn.Module:
        return nn.MaxPool2d(layer.kernel, layer.stride, layer.padding)


class AvgPool(Kind):
    """Global average pooling to one value per channel (ResNet's and MobileNetV2's head)."""

    prefix = "avgpool"

    def shape(self, layer: Layer, shape: Shape, fail: Fail) -> Shape:
        if len(shape) != 3:
            raise fail("expects a (C, H, W) input")
        return (shape[0], 1, 1)

    def module(self, layer: Layer) -> nn.Module:
        return nn.AdaptiveAvgPool2d(1)


class Flatten(Kind):
    prefix, free = "flatten", True

    def shape(self, layer: Layer, shape: Shape, fail: Fail) -> Shape:
        n = 1
        for s in shape:
            n *= s
        return (n,)

    def module(self, layer: Layer) -> nn.Module:
        return nn.Flatten()


class Dropout(Kind):
    prefix, free = "drop", True

    def shape(self, layer: Layer, shape: Shape, fail: Fail) -> Shape:
        if not 0.0 <= layer.p < 1.0:
            raise fail(f"dropout p={layer.p} must be in [0, 1)")
        return shape

    def module(self, layer: Layer) -> nn.Module:
        return nn.Dropout(layer.p)


class Block(Kind):
    """What residual blocks share: shapes from in_ch/out_ch/stride and a skip that is either
    the input ("identity"), a projection ("conv", resblock only) or none ("")."""

    prefix, weighted, unit, splittable, family = "block", True, True, True, "conv"
    skips: tuple[str, ...] = ()

    def shape(self, layer: Layer, shape: Shape, fail: Fail) -> Shape:
        _check_in(layer, shape, fail)
        if layer.skip not in self.skips:
            raise fail(f"skip {layer.skip!r}: valid {list(self.skips)}")
        if layer.skip == "identity" and (layer.stride != 1 or layer.in_ch != layer.out_ch):
            raise fail("an identity skip needs stride 1 and in_ch == out_ch")
        return (layer.out_ch, *_out_hw(replace(layer, padding=1), shape, fail, 3))

    @staticmethod
    def check_skip(layer: Layer, current: Index, kept: Index, fail: Fail) -> None:
        """An identity skip adds the input to the output: a width slice must keep the same
        channels of both."""
        same = (current is None and kept is None) or (
            current is not None and kept is not None and torch.equal(current, kept))
        if layer.skip == "identity" and not same:
            raise fail("its identity skip needs the same channels kept in and out")

    def split(self, layer: Layer, in_ch: int, groups: tuple[int, ...], grouped_in: bool,
              fail: Fail) -> Layer:
        if layer.skip == "identity" and not grouped_in:
            raise fail("its identity skip would add the shared input to the class paths: "
                       "start the class paths at a block that changes shape, or deeper")
        return replace(layer, in_ch=in_ch, out_ch=sum(groups), groups=groups,
                       grouped_in=grouped_in)


class ResBlock(Block):
    skips = ("identity", "conv")

    def module(self, layer: Layer) -> nn.Module:
        return PreActBlock(layer)

    def rows_per_group(self, layer: Layer, param: str) -> int | None:
        n = len(layer.groups)
        if param.startswith("bn1."):  # normalises the block's input
            return layer.in_ch // n if layer.grouped_in else None
        return layer.out_ch // n

    def slice_width(self, layer: Layer, current: Index, kept: Index, hidden: Index,
                    fail: Fail) -> tuple[Layer, Maps, Maps]:
        self.check_skip(layer, current, kept, fail)
        rows: Maps = {}
        cols: Maps = {}
        _put(rows, tuple(f"bn1.{p}" for p in BN_PARAMS), current)
        _put(rows, ("conv1.weight", "conv2.weight", *(f"bn2.{p}" for p in BN_PARAMS)), kept)
        _put(cols, ("conv1.weight",), current)
        _put(cols, ("conv2.weight",), kept)
        if layer.skip == "conv":
            _put(rows, ("shortcut.weight",), kept)
            _put(cols, ("shortcut.weight",), current)
        return _width(layer, current, kept), rows, cols


class Inverted(Block):
    skips = ("identity", "")

    def shape(self, layer: Layer, shape: Shape, fail: Fail) -> Shape:
        if layer.expand < 1 or layer.hidden < 1:
            raise fail(f"expand={layer.expand} and hidden={layer.hidden} must be >= 1")
        if layer.expand == 1 and layer.hidden != layer.in_ch:
            raise fail("with expand 1 there is no expansion: hidden must equal in_ch")
        return super().shape(layer, shape, fail)

    def module(self, layer: Layer) -> nn.Module:
        return InvertedResidual(layer)

    def split(self, layer: Layer, in_ch: int, groups: tuple[int, ...], grouped_in: bool,
              fail: Fail) -> Layer:
        if layer.expand == 1 and not grouped_in:
            raise fail("without an expansion its depthwise conv reads the shared input: "
                       "start the class paths deeper")
        n = len(groups)
        per = in_ch // n if layer.expand == 1 else layer.hidden // n
        if per < 1:
            raise fail(f"hidden={layer.hidden} channels cannot give {n} paths one each")
        split = super().split(layer, in_ch, groups, grouped_in, fail)
        return replace(split, hidden=per * n)

    def narrow(self, layer: Layer, total: int, groups: tuple[int, ...]) -> Layer:
        narrowed = super().narrow(layer, total, groups)
        return replace(narrowed, hidden=layer.hidden // total * len(groups))

    def rows_per_group(self, layer: Layer, param: str) -> int | None:
        n = len(layer.groups)
        if param.startswith(("project.", "bn3.")):
            return layer.out_ch // n
        return layer.hidden // n

    def slice_width(self, layer: Layer, current: Index, kept: Index, hidden: Index,
                    fail: Fail) -> tuple[Layer, Maps, Maps]:
        self.check_skip(layer, current, kept, fail)
        if layer.expand == 1:  # the depthwise conv reads the input itself
            hidden = current
        rows: Maps = {}
        cols: Maps = {}
        inner = ("dw.weight", *(f"bn2.{p}" for p in BN_PARAMS))
        if layer.expand != 1:
            inner += ("expand.weight", *(f"bn1.{p}" for p in BN_PARAMS))
            _put(cols, ("expand.weight",), current)
        _put(rows, inner, hidden)
        _put(rows, ("project.weight", *(f"bn3.{p}" for p in BN_PARAMS)), kept)
        _put(cols, ("project.weight",), hidden)
        sliced = _width(layer, current, kept)
        return (replace(sliced, hidden=layer.hidden if hidden is None else len(hidden)),
                rows, cols)


class PreActBlock(nn.Module):
    """The pre-activation basic block (see the module docstring), split into class paths
    when its layer has channel groups."""

    def __init__(self, layer: Layer):
        super().__init__()
        g_in, g_out = _path_groups(layer)
        i, o, s = layer.in_ch, layer.out_ch, layer.stride
        self.bn1 = nn.BatchNorm2d(i)
        self.conv1 = nn.Conv2d(i, o, 3, s, 1, groups=g_in, bias=False)
        self.bn2 = nn.BatchNorm2d(o)
        self.conv2 = nn.Conv2d(o, o, 3, 1, 1, groups=g_out, bias=False)
        self.shortcut = (nn.Conv2d(i, o, 1, s, groups=g_in, bias=False)
                         if layer.skip == "conv" else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """conv2(relu(bn2(conv1(relu(bn1(x)))))) plus the skip."""
        out = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + skip


class InvertedResidual(nn.Module):
    """MobileNetV2's inverted residual block (see the module docstring), split into class
    paths when its layer has channel groups."""

    def __init__(self, layer: Layer):
        super().__init__()
        g_in, g_out = _path_groups(layer)
        h = layer.hidden
        self.identity = layer.skip == "identity"
        self.expand = (nn.Conv2d(layer.in_ch, h, 1, groups=g_in, bias=False)
                       if layer.expand != 1 else None)
        self.bn1 = nn.BatchNorm2d(h) if layer.expand != 1 else None
        self.dw = nn.Conv2d(h, h, 3, layer.stride, 1, groups=h, bias=False)
        self.bn2 = nn.BatchNorm2d(h)
        self.project = nn.Conv2d(h, layer.out_ch, 1, groups=g_out, bias=False)
        self.bn3 = nn.BatchNorm2d(layer.out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """bn3(project(relu6(bn2(dw(relu6(bn1(expand(x)))))))), plus x for an identity skip."""
        out = x if self.expand is None else F.relu6(self.bn1(self.expand(x)))
        out = self.bn3(self.project(F.relu6(self.bn2(self.dw(out)))))
        return x + out if self.identity else out


KINDS: dict[str, Kind] = {
    "conv": Conv(), "bn": BatchNorm(), "relu": ReLU(), "relu6": ReLU6(), "maxpool": MaxPool(),
    "avgpool": AvgPool(), "flatten": Flatten(), "linear": Linear(), "dropout": Dropout(),
    "resblock": ResBlock(), "inverted": Inverted(),
}
