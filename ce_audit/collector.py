"""Python's cyclic garbage collector paused while a command starts.

Start-up creates several hundred thousand objects that live as long as the process (the modules of Typer,
Rich, NumPy, torch, matplotlib) and next to no garbage; the collector's passes over them while they are
imported are pure cost (about 0.2 s of a `ce-audit sweep`'s start, before its workers are forked). The
command line's process (``ce_audit.__main__``) and the painters pause it before their first import
(``pause``) and resume it once start-up is over (``resume``): the objects alive then are frozen into the
permanent generation (``gc.freeze``), so that later collections, and those of the processes forked from
it, skip them and leave their memory pages shared. A painter then collects once after each figure instead
of letting the automatic passes run (``collect``). ``resume`` only undoes ``pause``: where the collector
was not paused here (ce_audit used as a library, its tests in one process), it changes nothing.
"""

from __future__ import annotations

import gc

_paused = False
_manual = False  # automatic passes stay stopped after start-up: the process collects itself (``collect``)


def pause() -> None:
    """Stop the collector until ``resume``, where it runs."""
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


def resume(*, automatic: bool = True) -> None:
    """Start-up is over: freeze what is alive and run the collector again, where ``pause`` stopped it; with
    ``automatic=False`` its automatic passes stay stopped, for a process that collects once at the end of
    each piece of work (``collect``: a painter after each figure; drawing the default sweep's 12 figures
    in one process then grows its memory by 9 MB instead of 27 MB under automatic passes, in as much CPU)."""
    global _paused, _manual
    if _paused:
        _paused = False
        gc.freeze()
        if automatic:
            gc.enable()
        else:
            _manual = True


def collect() -> None:
    """One collection where ``resume(automatic=False)`` left the automatic passes stopped; else nothing."""
    if _manual:
        gc.collect()
