"""Precision: fp32 is the code path of before (bit for bit), bf16 autocast computes in bf16
while weights, updates, bytes and checkpoints stay float32, and lands within seed noise."""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cadfl.config import ConfigError, load_config
from cadfl.data.augment import crop_flip, crop_flip_draws
from cadfl.device import precision as prec
from cadfl.device.batched import train_batched
from cadfl.device.score import shared_layers
from cadfl.device.train import DeviceData, train_local
from cadfl.engine.evaluate import score_device, score_devices
from cadfl.engine.experiment import Experiment
from cadfl.engine.rounds import train_round
from cadfl.engine.run import read_metrics, run_experiment
from cadfl.fl.payload import Payload, TrainConfig, state_bytes
from cadfl.models import build_model, get_model

GOLDEN = Path(__file__).parent / "data" / "fp32_golden.json"
pytestmark = pytest.mark.usefixtures("one_thread")


def test_auto_picks_bf16_only_where_the_cpu_runs_it_fast(monkeypatch):
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() \
        else set()
    fast = bool(flags & {"amx_bf16", "avx512_bf16"})
    assert prec.resolve_precision("auto", "cpu") == ("bf16" if fast else "fp32")
    prec.cpu_bf16_flags.cache_clear()
    monkeypatch.setattr(prec, "CPU_BF16_FLAGS", ("no_such_flag",))
    try:
        assert prec.resolve_precision("auto", "cpu") == "fp32"
        assert prec.resolve_precision("bf16", "cpu") == "bf16"
        assert prec.resolve_precision("fp32", "cpu") == "fp32"
    finally:
        prec.cpu_bf16_flags.cache_clear()
    with pytest.raises(ValueError, match="precision: unknown 'fp16'; valid: fp32, bf16, auto"):
        prec.resolve_precision("fp16", "cpu")


def test_a_bad_precision_fails_before_any_work():
    with pytest.raises(ConfigError, match="precision: unknown 'half'; valid: fp32, bf16, auto"):
        load_config(None, ['precision="half"'])


def cpu_vendor() -> str:
    """The CPU's vendor (GenuineIntel, AuthenticAMD): an AVX512 kernel of one vendor's CPUs
    may round differently from another's."""
    info = Path("/proc/cpuinfo")
    for line in (info.read_text().splitlines() if info.exists() else []):
        if line.startswith("vendor_id"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def fingerprint(extra: tuple[str, ...], algorithms: list[str], out: Path) -> dict:
    """What the golden file holds: metric values (no wall time) and checkpoint hashes."""
    cfg = load_config(None, ["rounds=2", "algorithms=" + json.dumps(algorithms), *extra])
    lines = run_experiment(cfg, out, quiet=True)
    hashes = {}
    for a in algorithms:
        state = load_file(str(out / "checkpoints" / f"{a}.safetensors"))
        h = hashlib.sha256()
        for k in sorted(state):
            h.update(k.encode())
            h.update(state[k].contiguous().numpy().tobytes())
        hashes[a] = h.hexdigest()
    keep = ("round", "algorithm", "global_acc", "context_acc", "test_loss", "train_loss")
    return {"metrics": [{k: m[k] for k in keep} for m in lines], "checkpoints": hashes}


def test_fp32_is_bit_identical_to_the_code_before_precision(tmp_path):
    """The golden file was written by the code of 5c1ff66 (before `precision` existed), at one
    thread as this test runs: the
    same digits runs (sequential and 4 devices batched, 8 algorithms, 2 rounds) give the same
    metric values and the same checkpoint bytes, and so does a CIFAR-10 run where CADFL_DATA
    points at it. Floating-point kernels differ between CPU
    vendors and families, so it compares only where the golden file was made."""
    golden = json.loads(GOLDEN.read_text())
    here = (cpu_vendor(), torch.backends.cpu.get_cpu_capability(), torch.__version__)
    made = (golden["cpu_vendor"], golden["cpu_capability"], golden["torch"])
    if here != made:
        pytest.skip(f"golden file made on {' / '.join(made)}, this is {' / '.join(here)}")
    algorithms = golden["algorithms"]
    assert fingerprint(('precision="fp32"',), algorithms, tmp_path / "seq") == golden["sequential"]
    assert fingerprint(('precision="fp32"', "batch_devices=4"), algorithms,
                       tmp_path / "batched") == golden["batched"]
    data = os.environ.get("CADFL_DATA")
    if data:  # 3-channel images, now gathered channels-last, with crop and flip
        cifar = ('dataset="cifar10"', f"data_dir={json.dumps(data)}", 'model="fl_cnn"',
                 "data_fraction=0.02", "test_fraction=0.05", "batch_norm=false",
                 'precision="fp32"')
        assert fingerprint(cifar, golden["cifar_algorithms"], tmp_path / "cifar") == \
            golden["cifar"]


def last_context(precision: str, seed: int, out: Path) -> float:
    cfg = load_config(None, ["rounds=12", 'algorithms=["fedavg"]', f"seed={seed}",
                             f'precision="{precision}"'])
    return run_experiment(cfg, out, quiet=True)[-1]["context_acc"]


@pytest.mark.slow  # ~100 s where bf16 is emulated (no AVX512-BF16/AMX), over make test's budget
def test_bf16_lands_within_seed_noise_of_fp32_on_the_digits_default(tmp_path):
    """Three seeds at each precision (FedAvg, 12 rounds): the means differ by less than the
    spread of the seeds, and bf16 really computed something else."""
    seeds = (0, 1, 2)
    fp32 = [last_context("fp32", s, tmp_path / f"fp32-{s}") for s in seeds]
    bf16 = [last_context("bf16", s, tmp_path / f"bf16-{s}") for s in seeds]
    assert fp32 != bf16
    noise = max(statistics.stdev(fp32), statistics.stdev(bf16))
    assert abs(statistics.mean(bf16) - statistics.mean(fp32)) <= 2 * noise, (fp32, bf16)


def digits_job(precision: str) -> tuple[Payload, DeviceData]:
    torch.manual_seed(0)
    spec = get_model("digits_cnn", 10)
    images = torch.randint(0, 256, (100, 1, 8, 8), dtype=torch.uint8)
    labels = torch.arange(100) % 10
    data = DeviceData(images, labels, 10, (0.5,), (0.3,), crop_padding=1)
    cfg = TrainConfig(batch_size=16, lr=0.05, objective="prox", objective_args=(("mu", 0.1),),
                      precision=precision)
    return Payload(spec, build_model(spec).state_dict(), cfg), data


def test_bf16_trains_in_bf16_but_sends_float32_of_the_same_bytes():
    fp32, bf16 = (train_local(*digits_job(p)) for p in ("fp32", "bf16"))
    assert {k: v.dtype for k, v in bf16.state.items()} == {k: v.dtype
                                                            for k, v in fp32.state.items()}
    assert all(v.dtype in (torch.float32, torch.int64) for v in bf16.state.values())
    assert state_bytes(bf16.state) == state_bytes(fp32.state)
    assert not torch.equal(bf16.state["conv1.weight"], fp32.state["conv1.weight"])
    # bf16 has an 8-bit mantissa: one local epoch moves the weights by round-off, not more.
    torch.testing.assert_close(bf16.state["conv1.weight"], fp32.state["conv1.weight"],
                               rtol=0.05, atol=0.02)


def test_bf16_batched_training_equals_sequential_within_bf16_tolerance():
    spec = get_model("lenet5", 10, batch_norm=True)
    images = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    labels = torch.arange(48) % 10
    jobs = []
    for d in range(3):
        torch.manual_seed(d)
        data = DeviceData(images, labels, 10, (0.4,) * 3, (0.3,) * 3, crop_padding=2, flip=True,
                          index=torch.arange(d * 16, d * 16 + 13 + d))
        jobs.append((Payload(spec, build_model(spec).state_dict(),
                             TrainConfig(batch_size=8, lr=0.05, seed=d, precision="bf16")),
                     data))
    for got, ref in zip(train_batched(jobs), [train_local(p, d) for p, d in jobs], strict=True):
        assert got.metrics["train_loss"] == pytest.approx(ref.metrics["train_loss"], rel=0.02)
        for key, value in ref.state.items():
            assert got.state[key].dtype == value.dtype
            if value.is_floating_point():
                torch.testing.assert_close(got.state[key], value, rtol=0.02, atol=0.02,
                                           msg=key)


def test_augmentation_gathers_channels_last_batches_directly():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 5, 7, generator=g)
    dy, dx, mirror = crop_flip_draws(6, 2, True, g)
    out = crop_flip(x.contiguous(memory_format=torch.channels_last), 2, dy, dx, mirror)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(6):  # each image cut out and mirrored by slicing
        window = padded[i, :, dy[i, 0]:dy[i, 0] + 5, dx[i, 0]:dx[i, 0] + 7]
        assert torch.equal(out[i], window.flip(2) if mirror[i, 0] else window)


def test_a_run_records_the_precision_it_resolved(tmp_path):
    cfg = load_config(None, ["rounds=1", 'algorithms=["fedavg"]', 'precision="auto"'])
    run_experiment(cfg, tmp_path, quiet=True)
    chosen = prec.resolve_precision("auto", "cpu")
    assert load_config(tmp_path / "config.toml").precision == chosen
    assert [m["precision"] for m in read_metrics(tmp_path / "metrics.jsonl")] == [chosen]


def test_personal_models_sharing_a_body_score_as_one_by_one(tmp_path):
    """FedPer's devices share the body: run once over the test images, then each head; the
    scores equal those of scoring each device's whole model on its own images."""
    cfg = load_config(None, ["rounds=2", 'algorithms=["fedper"]', "devices=6"])
    exp = Experiment.setup(cfg)
    strategy = exp.strategy("fedper")
    runtime = exp.runtime()
    state = strategy.initial_state(exp.init)
    for rnd in (1, 2):
        state, _ = train_round(exp, strategy, rnd, state, runtime)
    models = [(d, p.spec, runtime.own_state(d, p))
              for d, p in strategy.configure_evaluate(2, state, exp.holding())]
    one_by_one = [score_device(exp, *m) for m in models]
    together = score_devices(exp, models)
    assert 0 < shared_layers(exp.spec, [s for _, _, s in models]) < len(exp.spec.layers)
    for a, b in zip(together, one_by_one, strict=True):
        assert a[0] == pytest.approx(b[0], abs=1e-9)
    bf16 = replace(exp, precision="bf16", _on_device=None, _cache={})
    assert [s[0] for s in score_devices(bf16, models)] == pytest.approx(
        [s[0] for s in one_by_one], abs=0.05)
