"""The device side: payloads and a device's data in, updates out, on a compute device.

`compute` chooses the compute device (CPU or CUDA), `store` keeps what each device keeps
between rounds (by layer and class path), `executor` runs a round's jobs one by one or in
same-shape batches (`batched`). The Flower ClientApp is the same device side on a Flower node.
"""

from .compute import resolve_device, to_compute
from .executor import Executor, Job, Result, Runtime
from .store import DeviceStore, kept_entries, with_kept

__all__ = ["DeviceStore", "Executor", "Job", "Result", "Runtime", "kept_entries",
           "resolve_device", "to_compute", "with_kept"]
