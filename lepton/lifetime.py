"""Process lifetime: children die with their parents, and a process tree can be ended whole.

Three processes serve: the launcher (`python -m lepton.server`), `tritonserver` (its child, in a
session of its own) and the Python backend stub (tritonserver's child, running model.py). None of
them may outlive its parent: a dead launcher would leave tritonserver holding the ports, and a
dead tritonserver would leave the stub and its memory behind.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import threading
import time

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def kill_with_parent() -> None:
    """In a freshly forked child (Popen's preexec_fn): SIGKILL this process when its parent dies."""
    # NOTE: the kernel sends the signal when the parent *thread* that forked ends, so the caller
    # must start the child from a thread that lives as long as the parent (the launcher's main one).
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def exit_with_parent(interval_s: float = 1.0) -> threading.Thread:
    """Start a daemon thread that ends this process (os._exit) once its parent process is gone."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        logger.error("parent process %d is gone; exiting", parent)
        os._exit(1)

    thread = threading.Thread(target=watch, name="lepton-parent-watch", daemon=True)
    thread.start()
    return thread


def descendants(pid: int) -> list[int]:
    """Every process below pid (children first, then theirs), read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                # NOTE: the command name (field 2) may hold spaces and parentheses: split after it.
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, frontier = [], [pid]
    while frontier:
        frontier = [child for parent in frontier for child in children.get(parent, [])]
        found += frontier
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL pid and every process below it (stopped or stuck ones included)."""
    for target in [pid, *descendants(pid)]:
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass


def port_in_use(host: str, port: int) -> bool:
    """Whether another process listens on host:port (a socket in TIME_WAIT does not count)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False
