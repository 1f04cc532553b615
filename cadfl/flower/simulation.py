"""`cadfl run --engine flower`: the experiment in Flower's simulation runtime.

The path Flower 1.42 supports (`flwr run` against a SuperLink in simulation mode; the older
`flwr.simulation.run_simulation` is deprecated): a `flower-superlink --simulation` on
127.0.0.1, a Flower connection whose options ask for one virtual SuperNode per device
(partition-id = device id), one CPU per ClientApp actor (Ray), and `flwr run` of cadfl's app
with the config written into the run directory. The ServerApp writes the same run directory as
cadfl's own engine; every process is stopped by PID at the end.

GPU: Ray hides GPUs from actors that ask for none. `gpus_per_client` > 0 gives each ClientApp
that share of a GPU (e.g. 0.25: four clients per GPU) and Ray the machine's GPUs.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from ..config import Config
from ..engine.run import read_metrics
from .env import flower_env


def cpu_count() -> int:
    """Cores this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def gpu_count() -> int:
    """GPUs torch sees here (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def backend_config(num_cpus: int | None = None, gpus_per_client: float = 0.0) -> dict:
    """Ray backend settings (`run_simulation`'s form): 1 CPU (and `gpus_per_client` of a
    GPU) per ClientApp, Ray limited to `num_cpus`, no dashboard."""
    gpus = gpu_count() if gpus_per_client else 0
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": gpus_per_client},
        "init_args": {"num_cpus": num_cpus or cpu_count(), "num_gpus": gpus,
                      "include_dashboard": False, "log_to_driver": False,
                      "logging_level": logging.ERROR},
    }


def simulation_options(num_supernodes: int, num_cpus: int | None = None,
                       gpus_per_client: float = 0.0) -> dict:
    """The same settings as a Flower connection's `options` (FLWR_HOME/config.toml)."""
    gpus = gpu_count() if gpus_per_client else 0
    return {"num-supernodes": num_supernodes,
            "backend": {"client-resources": {"num-cpus": 1, "num-gpus": gpus_per_client},
                        "init-args": {"num-cpus": num_cpus or cpu_count(), "num-gpus": gpus,
                                      "logging-level": "error", "log-to-driver": False}}}


def stop_leftovers(run_dir: Path, wait: float = 20.0) -> list[int]:
    """Wait (bounded) for the run's Ray processes to exit after `ray.shutdown()`, then stop
    any that remain, by PID: they are the live processes whose environment holds this run's
    FLWR_HOME. Returns the pids that had to be stopped."""
    from .deploy import marked, stop_pids

    marker = f"FLWR_HOME={flower_env(run_dir)['FLWR_HOME']}"
    deadline = time.monotonic() + wait
    left = marked(marker)
    while left and time.monotonic() < deadline:
        time.sleep(0.25)
        left = marked(marker)
    if left:
        stop_pids(left, 3.0)
    return sorted(left)


def run_flower_simulation(cfg: Config, out: Path, quiet: bool = True, timeout: float = 3600.0,
                          num_cpus: int | None = None, resume: bool = False,
                          gpus_per_client: float = 0.0) -> list[dict]:
    """Run every algorithm of `cfg` in Flower's simulation runtime; returns the metric
    lines (also in `out`/metrics.jsonl)."""
    from .deploy import DeployError, Deployment

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = out / "flower-experiment.toml"
    config.write_text(cfg.to_toml())
    options = simulation_options(cfg.devices, num_cpus, gpus_per_client)
    deployment = Deployment(out, 0, simulation=options)
    try:
        deployment.start()
        done = deployment.flwr_run({"config": str(config), "set": "", "out": str(out),
                                    "timeout": 60, "resume": resume}, timeout)
    finally:
        left = deployment.stop()
    if not quiet:
        print((deployment.logs / "flwr-run.log").read_text(errors="replace"))
    lines = read_metrics(out / "metrics.jsonl")
    expected = cfg.rounds * len(cfg.algorithms)
    if done.returncode != 0 or len(lines) != expected:
        raise DeployError(f"Flower simulation ended after {len(lines)} of {expected} rounds "
                          f"(flwr run exited {done.returncode}); logs in {deployment.logs}")
    if left:
        raise DeployError(f"processes still alive after stopping: {left}")
    return lines
