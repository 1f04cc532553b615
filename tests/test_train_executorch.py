"""A device's training in ExecuTorch's runtime (a node's `trainer=executorch`) against cadfl's
PyTorch device training (`train_local`): the same batches and SGD give the same update, within
float32 reassociation."""

from dataclasses import replace

import pytest
import torch

pytest.importorskip("executorch", reason="needs the train-mobile extra: "
                    "pip install 'cadfl[train-mobile]'")

from cadfl.device.train import DeviceData, train_local  # noqa: E402
from cadfl.device.train_executorch import (  # noqa: E402
    TRAINER_METRIC,
    train_executorch,
    unsupported_hooks,
)
from cadfl.fl.payload import Payload, TrainConfig  # noqa: E402
from cadfl.models import build_model  # noqa: E402
from cadfl.models.spec import spec_from_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# Relative to each tensor's largest magnitude (at least 1). Random 0-255 images leave no exact
# ties in a max-pool window, so the two runtimes differ only by float32 summation order:
# ~1e-7 per step; a wrong gradient or a different batch moves weights by lr * |g| >> 1e-3.
TOLERANCE = 1e-4


def device_data(flip: bool) -> DeviceData:
    """45 random uint8 images of 16 x 16 of classes 1, 3 and 4 (of 5): class 4 is not the
    model's, so it must be left out."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (45, 3, 16, 16), dtype=torch.uint8, generator=g)
    labels = torch.tensor([(1, 3, 4)[i % 3] for i in range(45)])
    return DeviceData(images, labels, num_classes=5, mean=(0.49, 0.48, 0.45),
                      std=(0.25, 0.24, 0.26), crop_padding=2, flip=flip)


def payload(augment: bool, **hooks) -> Payload:
    """A 2-class (1, 3) CNN with batch norm and max-pools, 2 epochs of batches of 8 (the last
    one smaller)."""
    spec = replace(spec_from_config("tiny", [8, "M", 16, "M"], (3, 16, 16), 2,
                                    batch_norm=True), classes=(1, 3))
    torch.manual_seed(1)
    state = {k: v.detach().clone() for k, v in build_model(spec).state_dict().items()}
    return Payload(spec, state, TrainConfig(epochs=2, batch_size=8, lr=0.05, seed=3,
                                            augment=augment, **hooks))


def largest_difference(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].double() - b[k].double()).abs().max())
               / max(1.0, float(b[k].double().abs().max())) for k in a)


def test_executorch_training_gives_the_pytorch_devices_update():
    """Weights, batch-norm statistics, samples, class counts and loss as `train_local`'s."""
    p, data = payload(augment=False), device_data(flip=True)
    want, got = train_local(p, data), train_executorch(p, data)
    diff = largest_difference(got.state, want.state)
    assert diff <= TOLERANCE, diff
    assert largest_difference(got.state, p.state) > 100 * TOLERANCE  # it did train
    assert got.num_samples == want.num_samples == 30
    assert got.class_counts == want.class_counts == [0, 15, 0, 15, 0]
    assert got.metrics["train_loss"] == pytest.approx(want.metrics["train_loss"], rel=1e-5)
    assert got.metrics["train_flops"] == want.metrics["train_flops"]
    assert got.metrics[TRAINER_METRIC] == 1.0 and TRAINER_METRIC not in want.metrics


@pytest.mark.slow  # an export of its own: ~11 s, over make test's budget
def test_augmentation_draws_the_same_crops_and_mirrors():
    """With crop and flip, only the padding's colour differs (the mean rounded to a grey
    level): the update stays close to PyTorch's, much closer than to a run whose crops and
    mirrors come from another seed."""
    p, data = payload(augment=True), device_data(flip=True)
    want, got = train_local(p, data), train_executorch(p, data)
    other = train_local(replace(p, config=replace(p.config, seed=4)), data)
    near, far = largest_difference(got.state, want.state), largest_difference(other.state,
                                                                              want.state)
    assert near < far / 10, (near, far)


@pytest.mark.slow  # an export of its own: ~11 s, over make test's budget
def test_a_straggler_stops_after_its_share_of_the_steps():
    p, data = payload(augment=False), device_data(flip=False)
    p = replace(p, config=replace(p.config, fraction=0.5))  # 4 of 8 steps
    want, got = train_local(p, data), train_executorch(p, data)
    assert largest_difference(got.state, want.state) <= TOLERANCE
    assert got.metrics["train_flops"] == want.metrics["train_flops"]


@pytest.mark.parametrize("hooks, named", [
    ({"objective": "prox", "objective_args": (("mu", 0.01),)}, "FedProx"),
    ({"head": ("fc*",), "head_epochs": 1}, "FedRep"),
    ({"control": True}, "SCAFFOLD"),
    ({"lr_scales": (("conv*", 2.0),)}, "path_lr"),
])
def test_training_beyond_plain_sgd_is_refused_in_one_line(hooks, named):
    p = payload(augment=False, **hooks)
    assert unsupported_hooks(p.config) and not unsupported_hooks(TrainConfig())
    with pytest.raises(ValueError, match=f"plain local SGD.*{named}") as err:
        train_executorch(p, device_data(flip=False))
    assert "\n" not in str(err.value)
