"""What a spool needs from the process: fork and exit hooks, installed at first use.

A spool keeps per-process state: the locks its claims hold, the process id
in the names it makes, the threads that empty ``trash/``.  After ``fork()``
the child must drop the parent's share of it, and at exit the reapers get a
moment to finish.  None of this is done when mailspool is imported: the
first spool a process opens calls :func:`install`, so an application that
only imports the package gets no hook at all.
"""

from __future__ import annotations

import atexit
import os
import threading

from mailspool.maildir import claim, directory, locks, trash

__all__ = ["install"]

_installed = False
_install_lock = threading.Lock()


def install() -> None:
    """Install the hooks once per process; cheap after the first call."""
    global _installed
    if _installed:
        return
    with _install_lock:
        if _installed:
            return
        # Until now this process has made no name, claim or reaper; a fork
        # before the first spool may have left the parent's process id in
        # the modules' state: start from this process's own.
        directory._after_fork_in_child()
        claim._after_fork_in_child()
        trash._after_fork_in_child()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(
                before=locks._before_fork,
                after_in_parent=locks._after_fork_in_parent,
                after_in_child=locks._after_fork_in_child,
            )
            os.register_at_fork(after_in_child=directory._after_fork_in_child)
            os.register_at_fork(after_in_child=claim._after_fork_in_child)
            os.register_at_fork(after_in_child=trash._after_fork_in_child)
        atexit.register(trash.stop_reapers, 1.0)
        _installed = True
