"""Looking inside models: activation maximisation, and the visualize/analyze commands."""

import json

import torch

from cadfl.analysis.maximize import filter_responses, maximize, response_module
from cadfl.cli import main
from cadfl.models import build_model, get_model
from tests import BASE


def test_activation_maximisation_raises_the_target_filter_above_start_and_other_filters():
    spec = get_model("digits_cnn", 10)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    filters = [0, 5, 9, 17, 30, 41]
    mean, std = (0.3,), (0.4,)
    images = maximize(model, spec, "conv2", filters, mean, std, steps=60, seed=0)
    index = response_module(spec, "conv2")
    noise = torch.randn(256, *spec.input_shape, generator=torch.Generator().manual_seed(1)) * 0.2
    with torch.no_grad():
        before = filter_responses(model, index, noise)  # the random starts' distribution
        after = filter_responses(model, index, (images - mean[0]) / std[0])
    rows = torch.arange(len(filters))
    target_after = after[rows, filters]
    gain = (target_after - before.mean(0)[filters]) / before.std(0)[filters]
    assert (gain > 5).all(), gain  # many standard deviations above a random start
    others = after.clone()
    others[rows, filters] = float("nan")
    assert (target_after > others.nanmean(dim=1)).all()
    assert images.min() >= 0 and images.max() <= 1  # clipped to the data range


def test_visualize_and_analyze_commands_on_a_run_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["run", BASE, "--out", str(run), "--quiet", "--set", "rounds=2",
                 "--set", 'algorithms=["cad"]', "--set", "devices=4"]) == 0
    ckpt = run / "checkpoints" / "cad.safetensors"
    assert main(["visualize", str(ckpt), "--layer", "conv3", "--filters", "0", "1", "2",
                 "--steps", "10", "--quiet", "--out", str(tmp_path / "vis")]) == 0
    assert (tmp_path / "vis" / "filters-conv3.png").stat().st_size > 0
    assert main(["analyze", str(ckpt), "--class", "4", "--samples", "300", "--quiet",
                 "--out", str(tmp_path / "an")]) == 0
    out = tmp_path / "an"
    for name in ("preference-conv1.png", "preference-conv3.png", "selectivity.png",
                 "critical-paths-4.png", "analysis.json"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "analysis.json").read_text())
    assert all(0.0 <= s <= 1.0 for s in summary["selectivity"].values())
    assert 0 <= summary["suggested_depth"] <= 3
    assert "suggested decoupling depth" in capsys.readouterr().out


def test_visualize_refuses_an_unknown_layer_with_the_valid_ones(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["run", BASE, "--out", str(run), "--quiet", "--set", "rounds=1",
                 "--set", 'algorithms=["fedavg"]', "--set", "devices=2"]) == 0
    code = main(["visualize", str(run / "checkpoints" / "fedavg.safetensors"),
                 "--layer", "conv9", "--quiet"])
    assert code == 2
    assert "conv1, conv2, conv3" in capsys.readouterr().err


def test_analyze_and_visualize_run_on_the_device_asked_for(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["run", BASE, "--out", str(run), "--quiet", "--set", "rounds=1",
                 "--set", 'algorithms=["cad"]', "--set", "devices=2"]) == 0
    ckpt = str(run / "checkpoints" / "cad.safetensors")
    if not torch.cuda.is_available():
        assert main(["analyze", ckpt, "--device", "cuda:3", "--quiet"]) == 2
        assert "torch sees 0 CUDA GPU" in capsys.readouterr().err
        return
    # On a GPU: the same analysis on CUDA and on the CPU, within float tolerance.
    for device in ("cpu", "cuda"):
        assert main(["analyze", ckpt, "--samples", "200", "--quiet", "--device", device,
                     "--out", str(tmp_path / device)]) == 0
        assert main(["visualize", ckpt, "--layer", "conv3", "--filters", "0", "--steps", "5",
                     "--quiet", "--device", device, "--out", str(tmp_path / device)]) == 0
    cpu, gpu = (json.loads((tmp_path / d / "analysis.json").read_text()) for d in ("cpu", "cuda"))
    for name, s in cpu["selectivity"].items():
        assert abs(s - gpu["selectivity"][name]) < 1e-3, name
