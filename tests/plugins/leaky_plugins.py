"""Plugins that leave something behind in their process, as real kernels under test do: each returns
correct losses, then changes state that a later call (its own or another implementation's) would see.

``honest`` reads all of that state: its losses are right only where none of it reached its process.
The leakers that go further (memory, output, processes) record what they did in $CE_AUDIT_TEST_MARKER.
"""

import os
import subprocess
import sys
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F

import ce_audit

SCALE_VARIABLE = "CE_AUDIT_TEST_LOSS_SCALE"


def _record(line: str) -> None:
    marker = os.environ.get("CE_AUDIT_TEST_MARKER")
    if marker:
        with open(marker, "a", encoding="utf-8") as stream:
            stream.write(line + "\n")


@ce_audit.register("honest")
def honest(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """F.cross_entropy on a copy made with torch's default device, scaled by $CE_AUDIT_TEST_LOSS_SCALE."""
    copy = torch.empty(logits.shape, dtype=logits.dtype)  # on the default device
    copy.copy_(logits)
    scale = float(os.environ.get(SCALE_VARIABLE, "1"))
    return (F.cross_entropy(copy, targets, reduction="none") * scale).to(logits.device)


@ce_audit.register("sets_environ")
def sets_environ(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    losses = honest(logits, targets)
    os.environ[SCALE_VARIABLE] = "3"
    return losses


@ce_audit.register("moves_default_device")
def moves_default_device(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    losses = honest(logits, targets)
    torch.set_default_device("meta")
    return losses


def _wrong_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, **options: object) -> torch.Tensor:
    return torch.zeros(logits.shape[0], dtype=logits.dtype)


@ce_audit.register("patches_cross_entropy")
def patches_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    losses = honest(logits, targets)
    F.cross_entropy = _wrong_cross_entropy
    return losses


@ce_audit.register("exits_later")
def exits_later(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Leaves a thread that ends the process half a second after the call returned."""
    losses = honest(logits, targets)
    threading.Thread(target=lambda: (time.sleep(0.5), os._exit(7)), daemon=True).start()
    return losses


@ce_audit.register("leaks_numpy", backend="numpy")
def leaks_numpy(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Asks NumPy for 64 GiB (never touched: without a cap the allocation only reserves address space)."""
    np.empty(64 << 30, dtype=np.uint8)
    return np.zeros(logits.shape[0], dtype=logits.dtype)


@ce_audit.register("leaks_torch")
def leaks_torch(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Asks PyTorch's CPU allocator for 64 GiB (never touched)."""
    torch.empty(64 << 30, dtype=torch.uint8)
    return F.cross_entropy(logits, targets, reduction="none")


@ce_audit.register("floods_output")
def floods_output(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Writes 64 MiB to stderr, then a last line, then aborts."""
    chunk = "x" * (1 << 20)
    for _ in range(64):
        sys.stderr.write(chunk)
    sys.stderr.write("\nfloods_output: the last line\n")
    sys.stderr.flush()
    os.abort()


@ce_audit.register("detaches")
def detaches(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Starts two processes that leave its process group: one in a session of its own, one daemonized
    by a double fork; records their pids."""
    sleeper = subprocess.Popen(["sleep", "300"], start_new_session=True)  # noqa: S607
    _record(f"pid {sleeper.pid}")
    reader, writer = os.pipe()
    if os.fork() == 0:  # the daemon's parent: a new session, a child, and gone
        os.setsid()
        daemon = os.fork()
        if daemon == 0:
            time.sleep(300)
            os._exit(0)
        os.write(writer, f"{daemon}\n".encode())
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as stream:
        _record(f"pid {stream.readline().strip()}")
    return F.cross_entropy(logits, targets, reduction="none")
