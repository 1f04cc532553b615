"""The run config: defaults, presets, `--set` parsing, and bad values refused clearly."""

import sys
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

from cadfl.cli import main
from cadfl.config import DEMO, Config, ConfigError, load_config, parse_override, validate
from cadfl.fl.payload import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PRESETS = sorted(CONFIGS.glob("*.toml"))


def leaf_keys(obj, prefix: str = "") -> set[str]:
    """Dotted names of every setting of a config dataclass, or of a nested TOML table."""
    items = ({f.name: getattr(obj, f.name) for f in fields(obj)} if is_dataclass(obj)
             else obj)
    out = set()
    for name, value in items.items():
        if is_dataclass(value) or isinstance(value, dict):
            out |= leaf_keys(value, f"{prefix}{name}.")
        else:
            out.add(prefix + name)
    return out


def test_defaults_validate():
    cfg = Config()
    assert validate(cfg) is cfg
    assert load_config() == Config()


def test_the_train_table_is_the_devices_train_config():
    """`[train]` holds the user's settings of `TrainConfig`, with the runs' defaults; the rest
    (seed, precision, the algorithms' hooks) is set per run, never written to a file."""
    train = load_config(None, ["train.batch_size=16", "train.augment=false"]).train
    assert train == TrainConfig(batch_size=16, augment=False)
    assert Config().train.batch_size == 32
    assert list(Config().to_dict()["train"]) == list(TrainConfig.SETTINGS)


def test_digits_10x5_preset_is_exactly_the_built_in_defaults():
    path = CONFIGS / "digits-10x5.toml"
    assert load_config(path) == Config()
    # Every setting is written out, so a new default shows up here until the preset has it.
    assert leaf_keys(tomllib.loads(path.read_text())) == leaf_keys(Config().to_dict())


def test_embedded_demo_is_the_cross_device_setting_with_every_setting_and_its_tuned_rates():
    demo = load_config(DEMO)
    # Many devices, a few classes each, a tenth taking part: the mission's setting.
    assert demo.devices >= 100 and demo.partition.k <= 2 and demo.sampled_per_round() == 10
    settings = {k for k in leaf_keys(tomllib.loads(DEMO.read_text())) if "overrides" not in k}
    assert settings == {k for k in leaf_keys(Config().to_dict()) if "overrides" not in k}
    assert set(demo.algorithms) <= set(demo.overrides)  # each at its own validated rate


def test_there_are_presets():
    names = {p.name for p in PRESETS}
    assert {"digits-10x5.toml", "cifar10-alexnet-5cls.toml", "cifar10-vgg16-5cls.toml"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads(path):
    cfg = load_config(path)
    assert validate(cfg) == cfg
    assert path.read_text().startswith("#"), "presets start with a comment saying what they are"


@pytest.mark.parametrize("model, lr, batch_norm", [("alexnet", 0.01, False),
                                                   ("vgg16", 0.05, True)])
def test_cifar_presets_follow_the_paper(model, lr, batch_norm):
    cfg = load_config(CONFIGS / f"cifar10-{model}-5cls.toml")
    assert (cfg.dataset, cfg.model, cfg.batch_norm) == ("cifar10", model, batch_norm)
    assert (cfg.devices, cfg.partition.scheme, cfg.partition.k) == (10, "classes", 5)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr) == (1, 64, lr)
    assert (cfg.train.momentum, cfg.train.weight_decay) == (0.9, 5e-4)
    assert (cfg.rounds, cfg.sample, cfg.target_acc) == (70, 1.0, 0.5)
    assert cfg.sampled_per_round() == 10
    assert {"fedavg", "fedprox"} <= set(cfg.algorithms)


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_config(None, ["rounds=4", "sample=3", "train.lr=0.02", "bn=keep_local",
                             'algorithms=["cad", "fedavg"]'])
    path = tmp_path / "config.toml"
    path.write_text(cfg.to_toml())
    assert load_config(path) == cfg
    assert isinstance(load_config(path).sample, int)


@pytest.mark.parametrize("text, keys, value", [
    ("rounds=5", ["rounds"], 5),
    ("train.lr=0.01", ["train", "lr"], 0.01),
    ("partition.k = 3", ["partition", "k"], 3),
    ('algorithms=["fedavg", "local"]', ["algorithms"], ["fedavg", "local"]),
    ("algorithms=['fedprox']", ["algorithms"], ["fedprox"]),
    ("dataset=digits", ["dataset"], "digits"),  # bare words are strings
    ('dataset="digits"', ["dataset"], "digits"),
    ("data_dir=/tmp/some dir", ["data_dir"], "/tmp/some dir"),
    ("train.augment=false", ["train", "augment"], False),
    ("sample=0.5", ["sample"], 0.5),
    ("eval_every=a=b", ["eval_every"], "a=b"),
])
def test_parse_override(text, keys, value):
    assert parse_override(text) == (keys, value)


def test_overrides_apply_on_top_of_a_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('rounds = 7\nmodel = "lenet5"\n[train]\nlr = 0.1\nepochs = 2\n')
    cfg = load_config(path, ["train.lr=0.2", "rounds=3", "partition.scheme=iid",
                             'algorithms=["local"]'])
    assert (cfg.rounds, cfg.model, cfg.train.lr, cfg.train.epochs) == (3, "lenet5", 0.2, 2)
    assert cfg.partition.scheme == "iid" and cfg.partition.k == Config().partition.k
    assert cfg.algorithms == ["local"]
    assert isinstance(cfg.train.lr, float)


def test_sample_int_is_a_device_count_and_float_a_fraction():
    assert load_config(None, ["sample=3"]).sampled_per_round() == 3
    assert load_config(None, ["sample=0.5"]).sampled_per_round() == 5
    assert load_config(None, ["sample=0.01"]).sampled_per_round() == 1
    assert load_config(None, ["devices=4", "sample=9"]).sampled_per_round() == 4


@pytest.mark.parametrize("override, needles", [
    ("rounds=0", ["rounds", "0", "[1, inf)"]),
    ("model=resnet9", ["model", "resnet9", "alexnet", "vgg16", "digits_cnn"]),
    ("colour=blue", ["colour", "valid", "rounds", "algorithms"]),
    ("train.foo=1", ["train.foo", "train.lr", "train.epochs"]),
    ("sample=1.5", ["sample", "1.5", "(0, 1]"]),
    ("sample=0", ["sample", "(0, 1]", ">= 1"]),
    ("train.lr=-1", ["train.lr", "-1", "(0, inf)"]),
    ("train.lr=nan", ["train.lr", "nan"]),
    ("train.momentum=1.5", ["train.momentum", "[0, 1]"]),
    ("data_fraction=0", ["data_fraction", "(0, 1]"]),
    ("test_fraction=1.5", ["test_fraction", "(0, 1]"]),
    ("rounds=abc", ["rounds", "int", "abc"]),
    ("rounds=2.5", ["rounds", "int", "2.5"]),
    ("batch_norm=yes", ["batch_norm", "bool"]),
    ("algorithms=[]", ["algorithms"]),
    ("algorithms=['fedavg', 'sgd']", ["algorithms[1]", "sgd", "fedprox"]),
    ("algorithms=['fedavg', 'fedavg']", ["algorithms", "twice"]),
    ("partition.scheme=random", ["partition.scheme", "iid", "dirichlet"]),
    ("train=5", ["train"]),
    ("train.seed=3", ["train.seed", "train.epochs", "train.augment"]),  # set per run
    ("train.objective=prox", ["train.objective"]),  # set by an algorithm
    ("fedprox.mu=-0.5", ["fedprox.mu", "-0.5", "[0, inf)"]),
    ("rounds", ["rounds", "key=value"]),
])
def test_bad_values_name_the_field_and_what_is_allowed(override, needles):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    for needle in needles:
        assert needle in str(info.value), f"{needle!r} missing from: {info.value}"


def test_bad_file_values_are_refused(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nbatch_size = 0\n")
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        load_config(path)
    path.write_text("rounds = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


@pytest.mark.parametrize("args, needle", [
    (["--set", "rounds=0"], "rounds"),
    (["--set", "model=resnet9"], "model"),
    (["--set", "nope=1"], "nope"),
    (["--set", "train.lr=-1"], "train.lr"),
    (["missing-config.toml"], "missing-config.toml"),
])
def test_cli_bad_value_exits_2_with_one_line(tmp_path, capsys, args, needle):
    out = tmp_path / "run"
    assert main(["run", *args, "--out", str(out), "--quiet"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("cadfl run: error:") and needle in lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert not out.exists(), "nothing is written before the config is valid"


def test_per_algorithm_overrides_change_only_that_algorithm(tmp_path):
    path = tmp_path / "tuned.toml"
    path.write_text('algorithms = ["fedavg", "fedprox"]\n'
                    '[overrides.fedavg]\ntrain.lr = 0.02\n'
                    '[overrides.fedprox]\nfedprox.mu = 0.5\ntrain.epochs = 2\n')
    cfg = load_config(path)
    assert cfg.train.lr == 0.05 and cfg.for_algorithm("fedavg").train.lr == 0.02
    prox = cfg.for_algorithm("fedprox")
    assert (prox.options_of("fedprox").mu, prox.train.epochs, prox.train.lr) == (0.5, 2, 0.05)
    assert load_config(None, ["overrides={fedavg={train={lr=0.02}}}"]).overrides == \
        {"fedavg": {"train": {"lr": 0.02}}}
    # The embedded default carries its tuned learning rates; a file lists its own.
    assert load_config(None, []).overrides["fedavg"] == {"train": {"lr": 0.02}}
    assert load_config(path).overrides.keys() == {"fedavg", "fedprox"}
    # The resolved config keeps them: a resumed run trains with the same settings.
    written = tmp_path / "written.toml"
    written.write_text(cfg.to_toml())
    assert load_config(written) == cfg


@pytest.mark.parametrize("table, message", [
    ('[overrides.fedavg]\nrounds = 3\n', "overrides.fedavg: unknown 'rounds'; valid: train"),
    ('[overrides.nope]\ntrain.lr = 0.1\n', "overrides: unknown 'nope'"),
    ('[overrides.fedavg]\ntrain.lr = -1.0\n', "train.lr: -1.0 is out of range"),
    ('[overrides.fedavg]\ncad.depth = 2\n', "overrides.fedavg: unknown 'cad'"),
])
def test_bad_overrides_are_refused_naming_the_field(tmp_path, table, message):
    path = tmp_path / "bad.toml"
    path.write_text(table)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(path)
