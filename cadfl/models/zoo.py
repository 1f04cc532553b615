"""The model zoo: each model is a config list turned into a `ModelSpec` by `spec_from_config`.

Exact shapes (CIFAR input 3x32x32):

- `lenet5`: conv 5x5 6 - pool - conv 5x5 16 - pool - fc 120 - fc 84 - fc K (no padding).
- `alexnet` (CIFAR variant): five 3x3 convs (padding 1) 64 - pool - 192 - pool - 384 - 256 - 256
  - pool (32 -> 16 -> 8 -> 4), then dropout 0.5 - fc 1024 - dropout 0.5 - fc 1024 - fc K on the
  256x4x4 = 4096 features; no batch norm (switchable). 172M multiply-adds forward, 167M of
  them in the convs.
- `vgg11` / `vgg16` (CIFAR variants): VGG configs A and D of 3x3 convs with batch norm (on by
  default, switchable), five 2x2 max-pools to 1x1x512, and one fc 512 -> K. VGG-16: 313M
  multiply-adds forward.
- `digits_cnn`: for 8x8 digits: conv 32 - pool - conv 64 - pool - conv 128 (batch norm) -
  fc K on 128x2x2. Small enough to train in seconds.
- `fl_cnn`: the 2-conv CIFAR CNN of federated-learning papers (McMahan et al. 2017): conv 5x5
  32 - pool - conv 5x5 64 - pool - fc 512 - fc K, unpadded (32 -> 28 -> 14 -> 10 -> 5:
  64x5x5 = 1600 features), no batch norm (switchable).
- `cnn64`: the CIFAR CNN of FedRep (Collins et al. 2021; `CNNCifar` in lgcollins/FedRep,
  models/Nets.py): conv 5x5 64 - pool - conv 5x5 64 - pool - fc 120 - fc 64 - fc K, unpadded
  (1600 features), no batch norm (switchable).
- `resnet18` (CIFAR variant of HeteroFL and FedRolex: `ResNet` in their models/resnet.py):
  a bare 3x3 conv 64 stem at stride 1, then 4 stages of 2 pre-activation basic blocks,
  64-128-256-512 channels, strides 1-2-2-2 (32 -> 4), each stage's first block projecting
  its shortcut where the shape changes; then batch norm - ReLU - global average pool - fc K.
  11.2M parameters, 555M multiply-adds forward. Batch norm throughout (not switchable).
- `mobilenet_v2` (CIFAR variant of kuangliu/pytorch-cifar, models/mobilenetv2.py: stride 1
  in the 3x3 stem and in the 24-channel stage, so 32 -> 4): 3x3 conv 32 - 17 inverted
  residual blocks (expansion, channels, repeats, first stride: 1-16-1-1, 6-24-2-1, 6-32-3-2,
  6-64-4-2, 6-96-3-1, 6-160-3-2, 6-320-1-1) - 1x1 conv 1280 - global average pool - fc K,
  batch norm and ReLU6 after every conv. Residual only where stride is 1 and channels agree,
  as in torchvision's MobileNetV2 (kuangliu's projects the others). `width` scales every
  width, rounded to a multiple of 8, and the last conv's 1280 only upwards (torchvision).
  2.24M parameters, 88M multiply-adds forward at width 1.
"""

from __future__ import annotations

from collections.abc import Callable

from .spec import ModelSpec, SpecError, spec_from_config

CIFAR_SHAPE = (3, 32, 32)
DIGITS_SHAPE = (1, 8, 8)

VGG_CONFIGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
}


def lenet5(num_classes: int = 10, input_shape: tuple[int, int, int] = CIFAR_SHAPE,
           batch_norm: bool = False) -> ModelSpec:
    """LeNet-5 (LeCun et al. 1998) with ReLU and max-pooling."""
    return spec_from_config("lenet5", [(6, 5, 0), "M", (16, 5, 0), "M"], input_shape,
                            num_classes, batch_norm=batch_norm, hidden=(120, 84))


def alexnet(num_classes: int = 10, input_shape: tuple[int, int, int] = CIFAR_SHAPE,
            batch_norm: bool = False) -> ModelSpec:
    """AlexNet for 32x32 inputs: 5 conv layers 64-192-384-256-256 and a 1024-1024 classifier."""
    return spec_from_config("alexnet", [64, "M", 192, "M", 384, 256, 256, "M"], input_shape,
                            num_classes, batch_norm=batch_norm, hidden=(1024, 1024), dropout=0.5)


def vgg11(num_classes: int = 10, input_shape: tuple[int, int, int] = CIFAR_SHAPE,
          batch_norm: bool = True) -> ModelSpec:
    """VGG-11 (config A) for CIFAR: 8 conv layers, one linear classifier."""
    return spec_from_config("vgg11", VGG_CONFIGS["vgg11"], input_shape, num_classes,
                            batch_norm=batch_norm)


def vgg16(num_classes: int = 10, input_shape: tuple[int, int, int] = CIFAR_SHAPE,
          batch_norm: bool = True) -> ModelSpec:
    """VGG-16 (config D) for CIFAR: 13 conv layers, one linear classifier."""
    return spec_from_config("vgg16", VGG_CONFIGS["vgg16"], input_shape, num_classes,
                            batch_norm=batch_norm)


def digits_cnn(num_classes: int = 10, input_shape: tuple[int, int, int] = DIGITS_SHAPE,
               batch_norm: bool = True) -> ModelSpec:
    """A small CNN for 8x8 digits whose last conv layer (128 filters) is wide enough to split."""
    return spec_from_config("digits_cnn", [32, "M", 64, "M", 128], input_shape, num_classes,
                            batch_norm=batch_norm)


def fl_cnn(num_classes: int = 10, input_shape: tuple[int, int, int] = CIFAR_SHAPE,
           batch_norm: bool = False) -> ModelSpec:
    """The 2-conv CNN of McMahan et al. 2017 as used for CIFAR in FL papers and libraries.

    The paper does not state the padding; the convs here are unpadded 5x5, as in the common
    PyTorch FL implementations (FedML, Flower's and PyTorch's CIFAR examples), so results and
    per-sample FLOPs compare with theirs: 64x5x5 = 1600 features reach fc 512 on 32x32 input.
    """
    return spec_from_config("fl_cnn", [(32, 5, 0), "M", (64, 5, 0), "M"], input_shape,
                            num_classes, batch_norm=batch_norm, hidden=(512,))


def cnn64(num_classes: int = 10, input_shape: tuple[int, int, int] = CIFAR_SHAPE,
          batch_norm: bool = False) -> ModelSpec:
    """FedRep's CIFAR CNN: two unpadded 5x5 convs of 64 filters, fc 1600-120-64-K."""
    return spec_from_config("cnn64", [(64, 5, 0), "M", (64, 5, 0), "M"], input_shape,
                            num_classes, batch_norm=batch_norm, hidden=(120, 64))


RESNET18_STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))  # (channels, first stride), 2 blocks
MOBILENET_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))  # (t, c, n, s)


def resnet18(num_classes: int = 10, input_shape: tuple[int, int, int] = CIFAR_SHAPE,
             batch_norm: bool = True) -> ModelSpec:
    """Pre-activation ResNet-18 for 32x32 inputs (HeteroFL, FedRolex)."""
    if not batch_norm:
        raise SpecError("resnet18 has batch norm inside its blocks: batch_norm=false is not "
                        "available")
    config: list = [("conv", 64)]
    for channels, stride in RESNET18_STAGES:
        config += [("res", channels, stride), ("res", channels, 1)]
    return spec_from_config("resnet18", [*config, "N", "A"], input_shape, num_classes)


def _divisible(value: float, divisor: int = 8) -> int:
    """torchvision's `_make_divisible`: the nearest multiple of `divisor`, never below 90%
    of `value`."""
    out = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * value else out


def mobilenet_v2(num_classes: int = 10, input_shape: tuple[int, int, int] = CIFAR_SHAPE,
                 batch_norm: bool = True, width: float = 1.0) -> ModelSpec:
    """MobileNetV2 for 32x32 inputs at width multiplier `width`."""
    if not batch_norm:
        raise SpecError("mobilenet_v2 has batch norm inside its blocks: batch_norm=false is "
                        "not available")
    if not 0 < width <= 4:
        raise SpecError(f"mobilenet_v2 width={width}: allowed (0, 4]")
    config: list = [_divisible(32 * width)]
    for t, c, n, s in MOBILENET_V2_STAGES:
        config += [("inv", t, _divisible(c * width), s if i == 0 else 1) for i in range(n)]
    config += [(_divisible(1280 * max(1.0, width)), 1, 0), "A"]
    return spec_from_config("mobilenet_v2", config, input_shape, num_classes, batch_norm=True,
                            act="relu6")


MODELS: dict[str, Callable[..., ModelSpec]] = {
    "lenet5": lenet5, "alexnet": alexnet, "vgg11": vgg11, "vgg16": vgg16,
    "digits_cnn": digits_cnn, "fl_cnn": fl_cnn, "cnn64": cnn64, "resnet18": resnet18,
    "mobilenet_v2": mobilenet_v2,
}
DEFAULT_INPUT = {"lenet5": CIFAR_SHAPE, "alexnet": CIFAR_SHAPE, "vgg11": CIFAR_SHAPE,
                 "vgg16": CIFAR_SHAPE, "digits_cnn": DIGITS_SHAPE, "fl_cnn": CIFAR_SHAPE,
                 "cnn64": CIFAR_SHAPE, "resnet18": CIFAR_SHAPE, "mobilenet_v2": CIFAR_SHAPE}
WIDTH_MODELS = ("mobilenet_v2",)  # models with a width multiplier


def get_model(name: str, num_classes: int = 10,
              input_shape: tuple[int, int, int] | None = None,
              batch_norm: bool | None = None, width: float = 1.0) -> ModelSpec:
    """Look a model up by name; unknown names fail with the list of valid ones. `width` is a
    width multiplier, for the models in `WIDTH_MODELS` only."""
    if name not in MODELS:
        raise SpecError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    kwargs: dict = {} if batch_norm is None else {"batch_norm": batch_norm}
    if width != 1.0:
        if name not in WIDTH_MODELS:
            raise SpecError(f"model {name!r} has no width multiplier (width={width}); models "
                            f"with one: {', '.join(WIDTH_MODELS)}")
        kwargs["width"] = width
    return MODELS[name](num_classes=num_classes, input_shape=input_shape or DEFAULT_INPUT[name],
                        **kwargs)
