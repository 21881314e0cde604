"""Device names: resolving `auto`, `all`, `cuda[:N]` and `mps`; torch is imported only when needed."""

from __future__ import annotations

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


def resolve_devices(requested: tuple[str, ...] | list[str], *, accelerators_wanted: bool = True) -> list[str]:
    """Concrete device names; `auto` is cpu plus the first accelerator, `all` is cpu plus every one.

    With ``accelerators_wanted`` False (only NumPy implementations), `auto` and `all` mean cpu and
    torch is not imported.
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
        else:
            present = accelerators()
            wanted = "cuda:0" if name == "cuda" else name
            if wanted not in present:
                have = ", ".join(present) or "none"
                raise AuditError(f"device {name!r} is not available here (accelerators present: {have})")
            found = [wanted]
        resolved += [device for device in found if device not in resolved]
    return resolved


def device_description(device: str) -> str:
    """A human name for the device, for report.json."""
    if device == "cpu":
        return platform.processor() or platform.machine() or "cpu"
    torch = _torch()
    if device.startswith("cuda"):
        return str(torch.cuda.get_device_name(torch.device(device)))
    return "Apple MPS"
