"""Process-wide state a call of an implementation can change for every later call.

Two kinds: ``ProcessState`` is what can be put back exactly (captured before a call, restored after it);
``GlobalState`` is what can only be compared — the environment, the attributes of torch, torch's
functional module, torch.Tensor and NumPy (a monkeypatch), torch's default device and function modes,
the live Python threads. In a worker process a difference retires the worker (the next call gets a
fresh one); in-process (``--isolation none``) what can be is put back and the change is reported.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# (name, whether an added attribute counts: on a class it shadows the base's; on a module it cannot)
WATCHED_NAMESPACES = (
    ("torch", False),
    ("torch.nn.functional", False),
    ("torch.Tensor", True),
    ("numpy", False),
)


def _flushes_denormals(torch: Any) -> bool:
    """Whether this thread flushes subnormals to zero (torch.set_flush_denormal has no getter)."""
    return bool(torch.tensor([1e-40], dtype=torch.float32).mul(1.0).item() == 0.0)


@dataclass
class ProcessState:
    """What a call of an implementation could change for every later call: captured, then restored."""

    cwd: str
    numpy_errors: Any  # numpy's error-mode dict
    numpy_random: Any
    python_random: Any
    warning_filters: list[Any]
    streams: tuple[Any, Any]
    torch: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def capture(cls) -> ProcessState:
        state = cls(
            cwd=os.getcwd(),
            numpy_errors=np.geterr(),
            numpy_random=np.random.get_state(),
            python_random=random.getstate(),
            warning_filters=list(warnings.filters),
            streams=(sys.stdout, sys.stderr),
        )
        torch = sys.modules.get("torch")  # never imported here: only restored where a call could use it
        if torch is not None and hasattr(torch, "get_default_dtype"):
            state.torch = {
                "default_dtype": torch.get_default_dtype(),
                "flush_denormal": _flushes_denormals(torch),
                "num_threads": torch.get_num_threads(),
                "rng": torch.get_rng_state(),
                "matmul_precision": torch.get_float32_matmul_precision(),
            }
        return state

    def restore(self) -> None:
        with contextlib.suppress(OSError):
            if os.getcwd() != self.cwd:
                os.chdir(self.cwd)
        np.seterr(**self.numpy_errors)
        np.random.set_state(self.numpy_random)
        random.setstate(self.python_random)
        warnings.filters[:] = self.warning_filters  # type: ignore[index]
        sys.stdout, sys.stderr = self.streams
        saved = self.torch
        torch = sys.modules.get("torch")
        if saved and torch is not None:
            torch.set_default_dtype(saved["default_dtype"])
            torch.set_flush_denormal(saved["flush_denormal"])
            if torch.get_num_threads() != saved["num_threads"]:
                torch.set_num_threads(saved["num_threads"])
            torch.set_rng_state(saved["rng"])
            torch.set_float32_matmul_precision(saved["matmul_precision"])
        elif torch is not None and hasattr(torch, "set_flush_denormal"):
            torch.set_flush_denormal(False)  # the call imported torch: back to torch's defaults
            torch.set_default_dtype(torch.float32)


def _namespace(name: str) -> Any:
    """The module (or class in a module) of that dotted name, if its module is imported; never imports."""
    module, _, attribute = name.rpartition(".")
    if name in sys.modules:
        return sys.modules[name]
    owner = sys.modules.get(module)
    return getattr(owner, attribute, None) if owner is not None else None


def _torch_device_state(torch: Any) -> tuple[str, int]:
    """torch's default device and the depth of its function-mode stack (set_default_device pushes one)."""
    device = str(torch.get_default_device()) if hasattr(torch, "get_default_device") else "cpu"
    depth = torch._C._len_torch_function_stack() if hasattr(torch._C, "_len_torch_function_stack") else 0
    return device, depth


@dataclass
class GlobalState:
    """State a call can change that ``ProcessState`` cannot simply restore: compared after the call."""

    environ: dict[str, str]
    namespaces: dict[str, dict[str, Any]]  # name -> a shallow copy of its attributes (identity compared)
    threads: frozenset[threading.Thread]
    torch_device: tuple[str, int] | None

    @classmethod
    def capture(cls) -> GlobalState:
        namespaces = {}
        for name, _ in WATCHED_NAMESPACES:
            namespace = _namespace(name)
            if namespace is not None:
                namespaces[name] = dict(vars(namespace))
        torch = sys.modules.get("torch")
        device = _torch_device_state(torch) if torch is not None and hasattr(torch, "_C") else None
        return cls(dict(os.environ), namespaces, frozenset(threading.enumerate()), device)

    def changes(self) -> list[str]:
        """What differs now from when this was captured, in words (empty: nothing)."""
        found = []
        now = dict(os.environ)
        names = self.environ.keys() | now.keys() if now != self.environ else set()
        keys = sorted(key for key in names if self.environ.get(key) != now.get(key))
        if keys:
            found.append(f"os.environ ({', '.join(keys[:3])}{', …' if len(keys) > 3 else ''})")
        for name, additions in WATCHED_NAMESPACES:
            before, namespace = self.namespaces.get(name), _namespace(name)
            if before is None or namespace is None:
                continue
            current = vars(namespace)
            if len(current) == len(before) and current == before:  # the common case, compared in C
                continue
            changed = [key for key, value in before.items() if current.get(key, _MISSING) is not value]
            if additions:
                changed += [key for key in current if key not in before]
            found += [f"{name}.{key}" for key in sorted(changed)]
        if any(thread.is_alive() for thread in set(threading.enumerate()) - self.threads):
            found.append("a thread left running")
        torch = sys.modules.get("torch")
        if self.torch_device is not None and torch is not None:
            device, depth = _torch_device_state(torch)
            if (device, depth) != self.torch_device:
                found.append(f"torch's default device ({device})")
        return found

    def restore(self) -> None:
        """Put back what can be: the environment, the attributes, torch's default device (not threads)."""
        if dict(os.environ) != self.environ:
            os.environ.clear()
            os.environ.update(self.environ)
        for name, additions in WATCHED_NAMESPACES:
            before, namespace = self.namespaces.get(name), _namespace(name)
            if before is None or namespace is None:
                continue
            current = dict(vars(namespace))
            for key, value in before.items():
                if current.get(key, _MISSING) is not value:
                    setattr(namespace, key, value)
            if additions:
                for key in current.keys() - before.keys():
                    delattr(namespace, key)
        torch = sys.modules.get("torch")
        saved = self.torch_device
        if saved is not None and torch is not None and _torch_device_state(torch) != saved:
            torch.set_default_device(None if saved[0] == "cpu" else saved[0])


_MISSING = object()


@contextlib.contextmanager
def preserved_state() -> Iterator[list[str]]:
    """Run the body, then put back every piece of process-wide state it may have changed; the list
    yielded is filled, after the body, with what it changed that only ``GlobalState`` sees."""
    state, watched = ProcessState.capture(), GlobalState.capture()
    changed: list[str] = []
    try:
        yield changed
    finally:
        state.restore()
        changed += watched.changes()
        if changed:
            watched.restore()
