"""The numeric precision of device compute: float32, or bfloat16 mixed precision.

`bf16` runs the forward pass and the loss under `torch.autocast` with bfloat16: convolutions
and matrix products in bf16, everything autocast keeps in float32 (losses, reductions) in
float32. Weights, gradients, optimizer state, what a device sends, aggregation and checkpoints
stay float32 (float64 where they were): only the compute changes, so the bytes do not.
`auto` is bf16 where the hardware runs it fast (a CUDA GPU with bf16, a CPU with AMX or
AVX512-BF16) and fp32 elsewhere. `fp32` is the exact code path of before bf16 existed.

Images are stored, and training batches come out, channels-last at bf16 and NCHW at fp32.
Weights are channels-last at both (as before bf16 existed), so convolutions run channels-last.
At bf16 channels-last input paid for every zoo CNN measured (`benchmarks/throughput.py`: up to
1.6x for fl_cnn); at fp32 the input layout is kept as it was, so that fp32 stays bit for bit
what it was (VGG-16 fp32 would be ~1.1x faster all-NCHW: not taken, to keep that).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from ..checks import check_one_of

PRECISIONS = ("fp32", "bf16", "auto")
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.cache
def cpu_bf16_flags() -> tuple[str, ...]:
    """Which of the CPU flags that make bf16 fast (AMX, AVX512-BF16) this CPU has, read from
    /proc/cpuinfo (empty where there is none, e.g. not Linux)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return ()
    return tuple(f for f in CPU_BF16_FLAGS if f in flags)


def resolve_precision(name: str, device: torch.device | str) -> str:
    """"fp32" or "bf16" for a config's `precision` on `device` ("auto": bf16 where the device
    runs it fast)."""
    check_one_of("precision", name, PRECISIONS)
    if name != "auto":
        return name
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_bf16_flags() else "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context the forward pass and loss run in: bf16 autocast, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format(precision: str) -> torch.memory_format:
    """The memory format images are stored in at `precision`, so that the batches gathered
    from them need no conversion."""
    return torch.channels_last if precision == "bf16" else torch.contiguous_format
