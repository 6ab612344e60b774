"""The compute device and forward dtype of a run, resolved once for quantize, verify and release."""

from __future__ import annotations

import torch

from ..core.config import Device, DType
from ..core.errors import ConfigError


def resolve_device(dev: Device, dtype: DType = DType.AUTO, gpu: int = 0) -> tuple[torch.device, torch.dtype]:
    """The compute device and forward dtype; AUTO dtype is bf16 on CUDA, fp32 on CPU (exact upcast of bf16).
    gpu: the CUDA device index (--device cuda:N)."""
    if dev is Device.CUDA and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but torch sees no CUDA device; use --device cpu")
    if dev is Device.AUTO:
        dev = Device.CUDA if torch.cuda.is_available() else Device.CPU
    if dev is Device.CUDA:
        if not 0 <= gpu < torch.cuda.device_count():
            raise ConfigError(f"--device cuda:{gpu}: torch sees {torch.cuda.device_count()} CUDA device(s), "
                              f"0..{torch.cuda.device_count() - 1}")
        device = torch.device("cuda", gpu)
    else:
        device = torch.device("cpu")
    if dtype is DType.AUTO:
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, getattr(torch, dtype.value)
