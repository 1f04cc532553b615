"""`cadfl profile` and the FLOP / energy profiler, checked against hand-computed values."""

from __future__ import annotations

import json

import pytest

from cadfl.analysis.profile import profile_model
from cadfl.cli import main
from cadfl.models import build_model, get_model
from cadfl.models.flops import flops_per_layer, train_flops


def run_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    """Run the CLI and parse its stdout, which must be exactly one JSON object."""
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_vgg16_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    out = run_json(capsys, ["profile", "vgg16", "--json"])
    assert out["model"] == "vgg16" and out["input_shape"] == [3, 32, 32]
    totals, layers = out["totals"], out["layers"]
    # The CIFAR VGG-16 does 313M multiply-adds per image; torch counts 2 FLOPs per multiply-add.
    assert totals["flops"] == pytest.approx(2 * 313e6, rel=0.02)
    assert totals["conv_flops_share"] > 0.99
    assert sum(lp["flops"] for lp in layers) == totals["flops"]
    assert sum(lp["params"] for lp in layers) == totals["params"]
    # conv1: 64 filters of 3x3x3 at each of the 32x32 output positions.
    conv1 = next(lp for lp in layers if lp["name"] == "conv1")
    assert conv1["flops"] == 2 * 32 * 32 * 64 * 3 * 9
    assert conv1["output_shape"] == [64, 32, 32]
    assert conv1["activation_bytes"] == 64 * 32 * 32 * 4
    for what in ("flops", "energy", "params"):
        conv, fc = totals[f"conv_{what}_share"], totals[f"fc_{what}_share"]
        assert 0 <= conv <= 1 and 0 <= fc <= 1 and conv + fc <= 1 + 1e-12
    assert totals["energy_pj"] > 0 and all(lp["energy_pj"] >= 0 for lp in layers)
    assert totals["conv_energy_share"] > 0.9


def test_energy_of_a_linear_layer_by_hand() -> None:
    # lenet5 fc3: 84 -> 10 with bias. MACs 840 at 4.6 pJ, 850 params from DRAM at 640 pJ,
    # 84 inputs + 10 outputs through SRAM at 5 pJ.
    fc3 = next(lp for lp in profile_model("lenet5").layers if lp.name == "fc3")
    assert fc3.flops == 2 * 84 * 10
    assert fc3.energy_pj == pytest.approx(840 * 4.6 + 850 * 640 + 94 * 5)


def test_flops_per_layer_matches_profile() -> None:
    spec = get_model("digits_cnn")
    per_layer = flops_per_layer(build_model(spec), spec.input_shape)
    assert list(per_layer) == list(spec.names)
    profile = profile_model("digits_cnn")
    assert per_layer == {lp.name: lp.flops for lp in profile.layers}
    # conv2: 32 -> 64 channels, 3x3, on the 4x4 map left by the first pool.
    assert per_layer["conv2"] == 2 * 4 * 4 * 64 * 32 * 9


def test_train_flops_about_three_times_forward() -> None:
    spec = get_model("digits_cnn")
    model = build_model(spec)
    forward = profile_model("digits_cnn").totals["flops"]
    step = train_flops(model, spec.input_shape, batch_size=4)
    assert 2.5 * 4 * forward <= step <= 3.5 * 4 * forward
    assert all(p.grad is None for p in model.parameters())  # the caller's model is untouched


def test_compare_plot(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    png = tmp_path / "compare.png"
    assert main(["profile", "--compare", "lenet5", "alexnet", "vgg16", "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in ("lenet5", "alexnet", "vgg16"))
    assert png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_json(capsys: pytest.CaptureFixture[str]) -> None:
    out = run_json(capsys, ["profile", "--compare", "lenet5", "digits_cnn", "--json"])
    assert [m["model"] for m in out["models"]] == ["lenet5", "digits_cnn"]


def test_table_and_bad_input_shape(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "lenet5", "--num-classes", "5"]) == 0
    text = capsys.readouterr().out
    assert "conv1" in text and "fc3" in text and "total" in text
    # lenet5's 5x5 convs leave nothing of an 8x8 input: a clean error, not a traceback.
    assert main(["profile", "lenet5", "--input-shape", "1,8,8"]) == 2
    assert "conv2" in capsys.readouterr().err
