"""`cadfl run --engine flower`: the experiment through Flower's simulation engine (Ray).

One virtual SuperNode per device of the config (partition-id = device id), one CPU per
ClientApp actor, one compute thread per actor; the ServerApp runs in this process and writes
the same run directory as cadfl's own engine.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from ..sim.config import Config
from .env import flower_env, flower_environment


def cpu_count() -> int:
    """Cores this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def backend_config(num_cpus: int | None = None) -> dict:
    """Ray backend settings: 1 CPU per ClientApp, Ray limited to `num_cpus`, no dashboard."""
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": num_cpus or cpu_count(), "num_gpus": 0,
                      "include_dashboard": False, "log_to_driver": False,
                      "logging_level": logging.ERROR},
    }


def stop_leftovers(run_dir: Path, wait: float = 20.0) -> list[int]:
    """Wait (bounded) for the run's Ray processes to exit after `ray.shutdown()`, then stop
    any that remain, by PID: they are the live processes whose environment holds this run's
    FLWR_HOME. Returns the pids that had to be stopped."""
    from .deploy import _kill, marked

    marker = f"FLWR_HOME={flower_env(run_dir)['FLWR_HOME']}"
    deadline = time.monotonic() + wait
    left = marked(marker)
    while left and time.monotonic() < deadline:
        time.sleep(0.25)
        left = marked(marker)
    if left:
        _kill(left, 3.0)
    return sorted(left)


def run_flower_simulation(cfg: Config, out: Path, quiet: bool = True, timeout: float = 600.0,
                          num_cpus: int | None = None, resume: bool = False) -> list[dict]:
    """Run every algorithm of `cfg` on Flower's simulation engine; returns the metric lines."""
    from flwr.simulation import run_simulation  # imported here: flwr is optional

    from .client_app import app as client_app
    from .server_app import make_server_app

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines: list[dict] = []
    with flower_environment(out):
        if quiet:
            logging.getLogger("flwr").setLevel(logging.WARNING)
        server_app = make_server_app(cfg, out, timeout, quiet, lines, resume)
        try:
            run_simulation(server_app=server_app, client_app=client_app,
                           num_supernodes=cfg.devices, backend_config=backend_config(num_cpus))
        finally:
            stop_leftovers(out)
    if len(lines) != cfg.rounds * len(cfg.algorithms):
        raise RuntimeError(f"Flower simulation ended after {len(lines)} of "
                           f"{cfg.rounds * len(cfg.algorithms)} rounds; see the log above")
    return lines
