"""How the `ce-audit` process ends once its command is done: without the interpreter's teardown.

Tearing down an interpreter that imported torch costs about 0.3 s of a 2-core machine (every module's
objects freed one by one), after the report is written and nothing is left to do. ``exit_now(code)`` does
what a normal exit does that can matter, in its order — other threads finished (thread pools shut down,
then every non-daemon thread joined), the atexit handlers (worker processes ended, temporary files
removed, logging flushed), stdout and stderr flushed — and then ends the process with ``os._exit``.
It takes the normal exit instead where flushing fails (the interpreter reports that its way), where
this Python has no ``threading._shutdown`` while another thread is alive (its work would be cut short),
and where the process is observed — a profiler, a tracer or a ``sys.monitoring`` tool (cProfile, coverage,
a debugger) — which writes what it saw after the program returns.
Only the command line's own process ends this way; ``ce_audit.cli.main`` called in a program returns.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading


def observed() -> bool:
    """Whether a profiler, a tracer or a ``sys.monitoring`` tool (Python ≥ 3.12) watches this process."""
    if sys.getprofile() is not None or sys.gettrace() is not None:
        return True
    monitoring = getattr(sys, "monitoring", None)
    return monitoring is not None and any(monitoring.get_tool(tool) for tool in range(6))


def exit_now(code: int) -> None:
    """End the process with ``code``: atexit handlers run and standard streams flushed, no teardown."""
    if observed():
        sys.exit(code)
    finish_threads = getattr(threading, "_shutdown", None)  # what Py_Finalize calls first (CPython)
    if finish_threads is not None:
        finish_threads()
    elif any(thread is not threading.main_thread() for thread in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()  # what Py_Finalize runs next
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except (OSError, ValueError):  # a closed pipe or stream: the normal exit reports it
        sys.exit(code)
    os._exit(code)
