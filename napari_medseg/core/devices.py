"""Device choice: CUDA, Apple MPS or CPU, automatic and overridable."""
from __future__ import annotations

import torch


def available_devices() -> list[str]:
    """Devices usable here, best first (always ends with ``"cpu"``)."""
    found = []
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found + ["cpu"]


def pick_device(requested: str = "auto") -> torch.device:
    """``"auto"`` → the best available device; otherwise validate the request with a clear error."""
    if requested in (None, "", "auto"):
        return torch.device(available_devices()[0])
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} requested but CUDA is not available here; "
                         f"use one of: {', '.join(available_devices())} or auto")
    if requested == "mps" and "mps" not in available_devices():
        raise ValueError("device 'mps' requested but Apple MPS is not available here; use auto or cpu")
    try:
        return torch.device(requested)
    except RuntimeError:
        raise ValueError(f"unknown device {requested!r}; use auto, cpu, cuda, cuda:N or mps") from None
