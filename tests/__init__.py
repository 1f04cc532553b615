"""cadfl's tests."""

from pathlib import Path

# The built-in defaults written out (digits, 10 devices x 5 classes, all taking part): the
# small base of tests that run the CLI or a Flower app, which without a config run the
# cross-device demo (cadfl/demo.toml), too sparse for a handful of devices.
BASE = str(Path(__file__).resolve().parent.parent / "configs" / "digits-10x5.toml")
