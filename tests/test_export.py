"""`cadfl export`: the exported file computes what the PyTorch model computes.

The reference for an ONNX file is the PyTorch model's own logits; for a CAD sub-model also the
full decoupled model's logits of the same classes, for a dense model restricted to some
classes the full dense model's. CIFAR-shaped checkpoints are built here from seeded weights
with the generated `synthetic` dataset at 3x32x32; digits checkpoints come from a one-round
run.
"""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime", reason="needs the mobile extra: pip install 'cadfl[mobile]'")
pytest.importorskip("onnxscript", reason="needs the mobile extra: pip install 'cadfl[mobile]'")

from cadfl.cad.decouple import decouple  # noqa: E402
from cadfl.cli import main  # noqa: E402
from cadfl.config import load_config  # noqa: E402
from cadfl.data.augment import to_float  # noqa: E402
from cadfl.engine.checkpoint import save_checkpoint  # noqa: E402
from cadfl.engine.run import run_experiment  # noqa: E402
from cadfl.export import files, report
from cadfl.export import model as xmodel  # noqa: E402
from cadfl.models import (  # noqa: E402
    MODELS,
    ModelSpec,
    build_loaded,
    build_model,
    get_model,
    with_classes,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CIFAR_MODELS = [("alexnet", 2), ("vgg11", 1)] + ([("fl_cnn", 1)] if "fl_cnn" in MODELS else [])


def within_tolerance(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """The export's own criterion, stated independently: relative to the largest logit."""
    return float((got - ref).abs().max()) <= files.TOLERANCE * max(1.0, float(ref.abs().max()))


def cad_checkpoint(root: Path, model: str, depth: int, others: bool) -> Path:
    """A run directory with a CAD checkpoint of `model` (seeded weights) on 3x32x32
    generated images; with `others`, class 10 is the Others path."""
    spec = get_model(model, 10)
    if others:
        spec = with_classes(spec, (10,))
    dec = decouple(spec, spec.num_classes, depth)
    torch.manual_seed(0)
    state = build_model(dec.spec).state_dict()
    last = dec.spec.names[-1]
    state[f"{last}.weight"] = state[f"{last}.weight"] * 100  # logits of order 1, not 0.01
    state[f"spare/{last}.weight"] = torch.zeros(3)  # the spare pool is not part of the model
    run = root / f"{model}-{others}"
    run.mkdir()
    cfg = load_config(None, ['dataset="synthetic"', f'model="{model}"', "synthetic.channels=3",
                             "synthetic.size=32", "synthetic.images=600",
                             "synthetic.test_images=300"])
    (run / "config.toml").write_text(cfg.to_toml())
    structure = {"decoupled": True, "dense_spec": spec.to_dict(), "decoupling": dec.to_dict()}
    save_checkpoint(run / "checkpoints", "cad", state, {
        "algorithm": "cad", "round": 1, "dataset": "synthetic", "spec": dec.spec.to_dict(),
        "structure": structure})
    return run / "checkpoints" / "cad.safetensors"


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, digits) -> Path:
    """One round of CAD (with Others) and FedAvg on digits."""
    out = tmp_path_factory.mktemp("export") / "run"
    cfg = load_config(None, ["devices=4", "rounds=1", 'algorithms=["cad","fedavg"]',
                             "cad.others=true", "partition.other_fraction=0.3"])
    run_experiment(cfg, out, quiet=True, dataset=digits)
    return out


def assert_exports(ckpt: Path, classes: list[int], others: bool, tmp: Path) -> None:
    """Export the context model of `classes` to ONNX and check its logits."""
    src = xmodel.load_source(ckpt)
    model = xmodel.context_model(src, classes, others)
    path = tmp / f"{src.spec.name}-{others}.onnx"
    files.write_onnx(model, path)
    x, _ = xmodel.class_images(src.dataset.test_x, src.dataset.test_y, classes, 40)
    noise = torch.randint(0, 256, (5, *src.spec.input_shape), dtype=torch.uint8)
    for images in (x, noise):
        got = files.file_logits(path, images)
        assert got.shape == (len(images), len(classes) + others)
        assert within_tolerance(got, xmodel.pytorch_logits(model, images))
        # The sub-model's logits are the full decoupled model's logits of its classes.
        full = xmodel.pytorch_logits(xmodel.full_model(src), images)
        cols = [src.spec.class_ids.index(c) for c in model.classes]
        assert within_tolerance(got, full[:, cols])
    assert model.kind == "cad-submodel"


@pytest.mark.parametrize("others", [False, True])
@pytest.mark.parametrize(("model", "depth"), CIFAR_MODELS)
def test_cifar_shaped_submodels_match_pytorch(tmp_path, model, depth, others):
    ckpt = cad_checkpoint(tmp_path, model, depth, others)
    assert_exports(ckpt, [7, 2], others, tmp_path)


@pytest.mark.parametrize("model", ["mobilenet_v2",
                                   pytest.param("resnet18", marks=pytest.mark.slow)])
def test_block_model_submodels_match_pytorch(tmp_path, model):
    assert_exports(cad_checkpoint(tmp_path, model, 2, False), [7, 2], False, tmp_path)


@pytest.mark.parametrize("others", [False, True])
def test_digits_submodel_matches_pytorch_on_real_images(tmp_path, digits_run, others):
    assert_exports(digits_run / "checkpoints" / "cad.safetensors", [3, 5, 8], others, tmp_path)


def test_submodel_is_physically_smaller(digits_run):
    src = xmodel.load_source(digits_run / "checkpoints" / "cad.safetensors")
    sub = xmodel.context_model(src, [3, 5])
    full = xmodel.full_model(src)
    assert sub.spec.num_classes == 2 and full.spec.num_classes == 11
    assert sum(v.numel() for v in sub.state.values()) < sum(v.numel() for v in src.state.values())
    assert report.multiply_adds(sub.spec) < report.multiply_adds(full.spec)
    assert not any(k.startswith("spare") for k in src.state)


def test_dense_checkpoint_exports_its_restricted_model(tmp_path, digits_run):
    src = xmodel.load_source(digits_run / "checkpoints" / "fedavg.safetensors")
    model = xmodel.context_model(src, [9, 0])
    assert model.kind == "dense-restricted" and model.classes == (9, 0)
    path = tmp_path / "dense.onnx"
    files.write_onnx(model, path)
    x = src.dataset.test_x[:50]
    dense = build_loaded(src.spec, src.state).eval()
    with torch.no_grad():
        ref = dense(to_float(x, src.dataset.mean, src.dataset.std))[:, [9, 0]]
    assert within_tolerance(files.file_logits(path, x), ref)


def test_cli_metadata_round_trips_and_batch_is_dynamic(tmp_path, digits_run, capsys):
    ckpt = digits_run / "checkpoints" / "cad.safetensors"
    out = tmp_path / "ctx.onnx"
    assert main(["export", str(ckpt), "--classes", "5", "3", "--others", "--out", str(out)]) == 0
    meta = files.read_metadata(out)
    record = json.loads(ckpt.with_suffix(".json").read_text())
    src = xmodel.load_source(ckpt)
    assert meta["classes"] == [5, 3, 10]
    assert meta["class_names"] == [src.dataset.classes[5], src.dataset.classes[3], "others"]
    assert meta["checkpoint_sha256"] == record["sha256"]
    assert meta["kind"] == "cad-submodel" and meta["others"] == 10
    assert meta["mean"] == list(src.dataset.mean) and meta["std"] == list(src.dataset.std)
    spec = ModelSpec.from_dict(meta["spec"])
    assert spec == xmodel.context_model(src, [5, 3], others=True).spec
    sess = files.session(out)
    images = src.dataset.test_x.permute(0, 2, 3, 1).contiguous().numpy()
    for n in (1, 7):
        assert sess.run(None, {"images": images[:n]})[0].shape == (n, 3)
    assert "onnxruntime matches PyTorch" in capsys.readouterr().out


def test_torchscript_export(tmp_path, digits_run):
    ckpt = digits_run / "checkpoints" / "cad.safetensors"
    out = tmp_path / "ctx.pt"
    assert main(["export", str(ckpt), "--classes", "1", "2", "--format", "torchscript",
                 "--out", str(out)]) == 0
    src = xmodel.load_source(ckpt)
    model = xmodel.context_model(src, [1, 2])
    x = src.dataset.test_x[:20]
    assert within_tolerance(files.file_logits(out, x), xmodel.pytorch_logits(model, x))
    assert files.read_metadata(out)["classes"] == [1, 2]


def test_int8_and_report(tmp_path, digits_run, capsys):
    ckpt = digits_run / "checkpoints" / "cad.safetensors"
    out = tmp_path / "ctx-int8.onnx"
    assert main(["export", str(ckpt), "--classes", "0", "1", "2", "3", "4", "--int8",
                 "--report", "--repeats", "5", "--calibration", "100", "--out",
                 str(out)]) == 0
    report = json.loads(out.with_suffix(".report.json").read_text())
    rows = report["models"]
    assert set(rows) == {"context", "full", "context int8", "full int8"}
    assert rows["context"]["multiply_adds"] < rows["full"]["multiply_adds"]
    assert rows["context"]["params"] < rows["full"]["params"]
    assert rows["context int8"]["file_bytes"] < rows["context"]["file_bytes"]
    assert all(r["latency_ms"] > 0 and 0 <= r["accuracy"] <= 1 for r in rows.values())
    assert files.read_metadata(out)["classes"] == [0, 1, 2, 3, 4]
    assert "QuantizeLinear" in {n.op_type for n in __import__("onnx").load(str(out)).graph.node}
    assert "int8: context accuracy" in capsys.readouterr().out


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_class_ids_and_others(tmp_path, digits_run, capsys):
    ckpt = str(digits_run / "checkpoints" / "cad.safetensors")
    out = str(tmp_path / "x.onnx")
    assert "class 42 is not a class" in one_line_error(
        capsys, ["export", ckpt, "--classes", "3", "42", "--out", out])
    assert "--others" in one_line_error(
        capsys, ["export", ckpt, "--classes", "10", "--out", out])
    assert "twice" in one_line_error(capsys, ["export", ckpt, "--classes", "3", "3", "--out", out])
    plain = cad_checkpoint(tmp_path, "fl_cnn" if "fl_cnn" in MODELS else "alexnet", 1, False)
    assert "no Others output" in one_line_error(
        capsys, ["export", str(plain), "--classes", "3", "--others", "--out", out])
    assert not Path(out).exists()


def test_foreign_checkpoints_are_refused(tmp_path, capsys):
    from safetensors.torch import save_file

    foreign = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    assert "not a cadfl checkpoint" in one_line_error(
        capsys, ["export", str(foreign), "--classes", "1", "--out", str(tmp_path / "x.onnx")])
    pickle = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, pickle)
    assert "expected a checkpoint" in one_line_error(
        capsys, ["export", str(pickle), "--classes", "1", "--out", str(tmp_path / "x.onnx")])


def test_missing_extra_is_named(monkeypatch):
    real = files.importlib.util.find_spec
    monkeypatch.setattr(files.importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(xmodel.ExportError, match=r"pip install 'cadfl\[mobile\]'"):
        files.require_mobile()


def test_mismatch_fails_loudly(tmp_path, digits_run):
    src = xmodel.load_source(digits_run / "checkpoints" / "cad.safetensors")
    model = xmodel.context_model(src, [3, 5])
    path = tmp_path / "ctx.onnx"
    files.write_onnx(model, path)
    # A file whose weights differ from the model it claims to be must not pass the check.
    key = next(k for k, v in model.state.items() if v.is_floating_point())
    other = xmodel.ExportModel(model.kind, model.spec,
                               {**model.state, key: model.state[key] + 1.0}, src)
    with pytest.raises(xmodel.ExportError, match="differ from PyTorch"):
        files.check(other, path, src.dataset.test_x[:30])
