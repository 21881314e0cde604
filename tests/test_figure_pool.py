"""report.html's figures on two cores: every other one drawn in a forked child, the same results in order."""

from __future__ import annotations

import os

import pytest

from ce_audit.reports import figure_pool
from ce_audit.reports.figure_pool import draw_all

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork")


@pytest.fixture(autouse=True)
def two_cores(monkeypatch):
    monkeypatch.setattr(figure_pool, "default_threads", lambda: 2)


@pytest.fixture
def forked(monkeypatch) -> list[int]:
    """The children draw_all forks, recorded."""
    pids: list[int] = []
    fork = os.fork

    def recorded() -> int:
        pid = fork()
        if pid:
            pids.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", recorded)
    return pids


def _reaped(pids: list[int]) -> bool:
    """Every one of ``pids`` waited for already (not a child of this process any more)."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
            return False
        except ChildProcessError:
            pass
    return True


def test_every_other_draw_runs_in_a_child_and_the_results_keep_their_order(forked):
    here = os.getpid()
    drawn = draw_all([lambda i=i: (i, os.getpid()) for i in range(5)])
    assert [index for index, _ in drawn] == [0, 1, 2, 3, 4]
    assert [pid == here for _, pid in drawn] == [True, False, True, False, True]
    assert forked and _reaped(forked)


def test_one_core_or_one_draw_draws_here(monkeypatch):
    here = os.getpid()
    assert draw_all([os.getpid]) == [here]
    monkeypatch.setattr(figure_pool, "default_threads", lambda: 1)
    assert draw_all([os.getpid, os.getpid]) == [here, here]


def test_what_the_child_does_not_deliver_is_drawn_here(forked):
    here = os.getpid()

    def dies_in_the_child() -> int:
        if os.getpid() != here:
            os._exit(3)
        return here

    assert draw_all([os.getpid, dies_in_the_child, os.getpid]) == [here] * 3
    unpicklable = draw_all([lambda: 1, lambda: (lambda: 2)])  # a lambda cannot be sent back
    assert unpicklable[0] == 1 and unpicklable[1]() == 2
    assert forked and _reaped(forked)


def test_an_error_here_ends_the_child(forked):
    def fails_here() -> None:
        raise RuntimeError("drawing failed")

    with pytest.raises(RuntimeError, match="drawing failed"):
        draw_all([fails_here, lambda: __import__("time").sleep(30)])
    assert forked and _reaped(forked)
