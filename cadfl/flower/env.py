"""The environment of every Flower run: no telemetry, no update checks, no runtime installs,
Ray kept on this machine, Flower's home inside the run directory, one thread per worker."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

FIXED = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # One compute thread per worker process: workers already run side by side.
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    # How often a SuperExec asks for work (default 1 s): a message waits for it twice a round.
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.25",
}


def flower_env(run_dir: Path) -> dict[str, str]:
    """The variables every Flower process of a run gets (FLWR_HOME = RUN_DIR/flwr-home)."""
    home = Path(run_dir).resolve() / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    return {**FIXED, "FLWR_HOME": str(home)}


@contextlib.contextmanager
def flower_environment(run_dir: Path) -> Iterator[dict[str, str]]:
    """Set `flower_env(run_dir)` in this process for the duration (Ray and in-process Flower
    read os.environ; workers inherit it), then restore the previous environment (including
    variables Flower itself changes, such as PYTHONPATH)."""
    before = dict(os.environ)
    env = flower_env(run_dir)
    os.environ.update(env)
    try:
        yield env
    finally:
        os.environ.clear()
        os.environ.update(before)


def child_env(run_dir: Path) -> dict[str, str]:
    """The full environment for a Flower daemon started as a subprocess."""
    return {**os.environ, **flower_env(run_dir)}
