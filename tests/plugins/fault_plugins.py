"""Plugins that misbehave as real kernels under test do: crash, exit, hang, raise a BaseException, or
change process-wide state. Each prints a line first, so that a failed cell can quote it.

``state_changer`` returns correct losses but leaves NumPy raising on every floating-point error, flushes
subnormals, moves to another directory, makes float64 the default dtype and reseeds the RNGs.
``marked_slow`` appends a line to the file named by CE_AUDIT_TEST_MARKER at each call and sleeps a little
(interruption tests wait for it).
"""

import ctypes
import os
import random
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

import ce_audit


class KernelPanic(BaseException):
    """Not an Exception: ``except Exception`` does not catch it."""


def _announce(what: str) -> None:
    print(f"{what}: about to misbehave", flush=True)


@ce_audit.register("segfaults")
def segfaults(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Reads address 0."""
    _announce("segfaults")
    ctypes.string_at(0)
    return F.cross_entropy(logits, targets, reduction="none")


@ce_audit.register("aborts")
def aborts(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """os.abort(), as a failed assertion in a C extension."""
    _announce("aborts")
    os.abort()


@ce_audit.register("exits")
def exits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sys.exit(3)."""
    _announce("exits")
    sys.exit(3)


@ce_audit.register("hard_exits")
def hard_exits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """os._exit(4): no cleanup, no exception."""
    _announce("hard_exits")
    os._exit(4)


@ce_audit.register("hangs")
def hangs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sleeps far past any test's --timeout."""
    _announce("hangs")
    time.sleep(600)
    return F.cross_entropy(logits, targets, reduction="none")


@ce_audit.register("raises_base")
def raises_base(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Raises a BaseException that is not an Exception."""
    _announce("raises_base")
    raise KernelPanic("device lost")


@ce_audit.register("state_changer")
def state_changer(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Correct losses, computed after changing every piece of process-wide state it can reach."""
    losses = F.cross_entropy(logits, targets, reduction="none")
    np.seterr(all="raise")
    torch.set_flush_denormal(True)
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(1234)
    np.random.seed(1234)
    random.seed(1234)
    os.chdir(tempfile.gettempdir())
    return losses


@ce_audit.register("marked_slow")
def marked_slow(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Correct losses, slowly; each call leaves a line in $CE_AUDIT_TEST_MARKER."""
    marker = os.environ.get("CE_AUDIT_TEST_MARKER")
    if marker:
        with open(marker, "a", encoding="utf-8") as stream:
            stream.write("called\n")
    time.sleep(0.05)
    return F.cross_entropy(logits, targets, reduction="none")
