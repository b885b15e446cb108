"""Where a local model runs: `--device` and `--dtype` resolved once, with a clear error for a device that is not there.

Defaults do the right thing: `auto` is the GPU when there is one (all of them, through `device_map="auto"`, when
there are several) and the CPU otherwise; the dtype follows the device (bfloat16 on a GPU that supports it,
float16 on one that does not, float32 on the CPU).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from ..errors import ConfigError

DTypeName = Literal["auto", "bfloat16", "float16", "float32"]
DTYPES: tuple[DTypeName, ...] = ("auto", "bfloat16", "float16", "float32")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def check_device(name: str) -> str:
    """`name` ("auto", "cpu", "cuda", "cuda:N") checked against this machine; returns it resolved ("auto" becomes
    "cuda" or "cpu"). Raises `ConfigError` for a GPU that is absent."""
    if not _DEVICE_RE.match(name):
        raise ConfigError(f"--device {name!r}: expected cpu, cuda, cuda:N or auto")
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available here (no GPU, or a CPU-only torch build)")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


def torch_dtype(name: DTypeName, device: str) -> Any:
    """The torch dtype for `--dtype NAME` on a resolved `device`."""
    import torch

    if name == "auto":
        if not device.startswith("cuda"):
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in DTYPES:
        raise ConfigError(f"--dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def placement(device: str = "auto", dtype: DTypeName = "auto") -> tuple[str, Any, str | None]:
    """(device, torch dtype, device_map) for loading a model: `device_map="auto"` spreads a model over every GPU
    when `auto` finds more than one (a model larger than one GPU), else the model is moved to `device`."""
    import torch

    resolved = check_device(device)
    device_map = "auto" if device == "auto" and resolved == "cuda" and torch.cuda.device_count() > 1 else None
    return resolved, torch_dtype(dtype, resolved), device_map
