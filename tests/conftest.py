"""Fixtures shared by the test modules."""

import pytest
import torch

from cadfl.data.datasets import load_dataset


@pytest.fixture(scope="module")
def one_thread():
    """One compute thread: tiny models run as fast on one, the arithmetic is the same as in
    Flower's one-thread workers, and on a shared 2-core machine a second thread waiting at
    every op's barrier for a busy core can make a round 100x slower."""
    mp = pytest.MonkeyPatch()
    before = torch.get_num_threads()
    mp.setenv("OMP_NUM_THREADS", "1")  # run_experiment's set_threads() honours it
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    mp.undo()


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's bundled digits as a cadfl Dataset."""
    return load_dataset("digits")
