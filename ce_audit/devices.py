"""Device names: resolving `auto`, `all`, `cuda[:N]` and `mps`; torch is imported only when needed."""

from __future__ import annotations

import functools
import os
import platform
import re
from typing import Any

from ce_audit.errors import AuditError

_DEVICE_PATTERN = re.compile(r"^(cpu|auto|all|mps|cuda(:\d+)?)$")


def _torch() -> Any:
    import torch

    return torch


def accelerators() -> list[str]:
    """Every accelerator torch sees here: cuda:0 … cuda:N−1, then mps."""
    torch = _torch()
    found = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


# Device nodes of the GPUs torch can use on Linux: NVIDIA's driver, AMD's ROCm, WSL's GPU.
GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


def cpu_alone(requested: tuple[str, ...] | list[str]) -> bool:
    """Whether ``requested`` devices surely resolve to the CPU alone, known without importing torch: each
    is cpu, or auto/all on a Linux machine with none of GPU_DEVICE_NODES (no accelerator to find)."""
    names = {name.strip().lower() for name in requested}
    if names <= {"cpu"}:
        return True
    linux_without_gpu = platform.system() == "Linux" and not any(map(os.path.exists, GPU_DEVICE_NODES))
    return names <= {"cpu", "auto", "all"} and linux_without_gpu


def resolve_devices(
    requested: tuple[str, ...] | list[str], *, accelerators_wanted: bool = True, present_only: bool = True
) -> list[str]:
    """Concrete device names; `auto` is cpu plus the first accelerator, `all` is cpu plus every one.

    With ``accelerators_wanted`` False (only NumPy implementations), `auto` and `all` mean cpu and
    torch is not imported. With ``present_only`` False a named accelerator (cuda, cuda:N, mps) is taken
    as it is, not looked for here (the units run on other machines: ``--executor ray``).
    """
    resolved: list[str] = []
    for name in requested:
        name = name.strip().lower()
        if not _DEVICE_PATTERN.match(name):
            raise AuditError(f"unknown device {name!r}; use cpu, cuda, cuda:N, mps, auto or all")
        if name == "cpu":
            found = ["cpu"]
        elif name in ("auto", "all"):
            found = ["cpu"]
            if accelerators_wanted:
                present = accelerators()
                found += present[:1] if name == "auto" else present
        elif not present_only:
            found = ["cuda:0" if name == "cuda" else name]
        else:
            present = accelerators()
            wanted = "cuda:0" if name == "cuda" else name
            if wanted not in present:
                have = ", ".join(present) or "none"
                raise AuditError(f"device {name!r} is not available here (accelerators present: {have})")
            found = [wanted]
        resolved += [device for device in found if device not in resolved]
    return resolved


def cpu_model() -> str:
    """The processor's model name (Linux: /proc/cpuinfo), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith(("model name", "Model", "cpu model")) and ":" in line:
                    name = " ".join(line.partition(":")[2].split())
                    if name:
                        return name
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


@functools.cache
def device_description(device: str) -> str:
    """A human name for the device (the CPU model, the GPU's name), for report.json and the
    ``device_name`` column."""
    if device == "cpu":
        return cpu_model()
    torch = _torch()
    if device.startswith("cuda"):
        return str(torch.cuda.get_device_name(torch.device(device)))
    return "Apple MPS"


def device_name(device: str) -> str:
    """``device_description``, or "" where the device cannot be asked (it is not present here)."""
    try:
        return device_description(device)
    except Exception:  # noqa: BLE001 - a name is informative; its absence never stops an audit
        return ""
