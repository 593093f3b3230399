"""The one place a params device is checked and resolved (`engine.device`, `train.device`).

`auto` picks cuda when a GPU is visible; asking for cuda without one is an error naming the
key, never a silent fallback to the CPU. torch is imported only when a GPU must be looked for.
"""

from __future__ import annotations

import os

from pipeline.errors import ConfigError, DeviceMissing

DEVICES = ("auto", "cpu", "cuda")  # or cuda:N


def is_device(name: str) -> bool:
    """A device params may name: auto, cpu, cuda or cuda:N."""
    return name in DEVICES or (name.startswith("cuda:") and name[5:].isdigit())


def check_device(requested: str, key: str = "engine.device") -> str:
    """`requested`, if it is a device params may name."""
    if not is_device(requested):
        raise ConfigError(f"params key '{key}' is {requested!r}; allowed: auto | cpu | cuda | cuda:N")
    return requested


def usable_cpus() -> int:
    """The CPUs this process may run on: a container's or taskset's limit where the OS tells it
    (`os.sched_getaffinity`), else the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def require_visible(requested: str, key: str) -> None:
    """A cuda request needs a visible GPU (checked before any work by `mer check` and the stages)."""
    if check_device(requested, key).startswith("cuda") and not cuda_available():
        raise DeviceMissing(f"params key '{key}' is {requested!r} but no CUDA device is visible; "
                            "allowed here: auto | cpu")


def resolve_device(requested: str, key: str = "engine.device") -> str:
    """The device to run on: cpu, cuda or cuda:N."""
    require_visible(requested, key)
    if requested != "auto":
        return requested
    return "cuda" if cuda_available() else "cpu"
