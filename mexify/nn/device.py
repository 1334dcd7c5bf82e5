"""Where models and tensors live: one rule for picking and reading devices."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from mexify.errors import ConfigError

__all__ = ["resolve_device", "parse_device", "module_device", "device_name"]

_KINDS = ("cpu", "cuda", "mps")


def resolve_device(device: Optional[Union[str, torch.device]] = None) -> torch.device:
    """``device`` as a ``torch.device`` (checked by :func:`parse_device`); None means CUDA when
    available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return parse_device(device)


def parse_device(device: Union[str, torch.device]) -> torch.device:
    """A device that exists on this machine: ``cpu``, ``cuda``, ``cuda:N`` (N below the number of
    GPUs) or ``mps``.

    Raises:
        ConfigError: text that names no device, or a device this machine does not have.
    """
    try:
        dev = device if isinstance(device, torch.device) else torch.device(str(device).strip().lower())
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"unknown device {device!r}", "use cpu, cuda, cuda:N or mps") from None
    if dev.type not in _KINDS:
        raise ConfigError(f"device {device!r} is not supported", "use cpu, cuda, cuda:N or mps")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device {device!r} asked for but CUDA is not available here", "use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"device {device!r} does not exist: this machine has {count} CUDA device"
                              f"{'s' if count > 1 else ''}", f"use cuda:0 .. cuda:{count - 1}, or cpu")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"device {device!r} asked for but MPS is not available here", "use --device cpu")
    if dev.type == "cpu" and dev.index not in (None, 0):
        raise ConfigError(f"device {device!r} does not exist", "use --device cpu")
    return dev


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter (or buffer); the CPU for a module with neither."""
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    """What latency profiles are filed under: the GPU's name, or ``"cpu"``."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
