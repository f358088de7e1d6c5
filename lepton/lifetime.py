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
import shutil
import signal
import socket
import subprocess
import sys

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def kill_with_parent() -> None:
    """In a freshly forked child (Popen's preexec_fn): SIGKILL this process when its parent dies."""
    # NOTE: the kernel sends the signal when the parent *thread* that forked ends, so the caller
    # must start the child from a thread that lives as long as the parent (the launcher's main one).
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


# NOTE: a separate process, not a thread: a stub whose threads are all stuck (seen: waiting on locks
# after tritonserver was killed, once in about a dozen kills) never runs a Python thread again.
_WATCHER = """
import os, signal, sys, time
watched, parent = int(sys.argv[1]), int(sys.argv[2])
def ppid(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return int(stat.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None
while True:
    time.sleep(float(sys.argv[3]))
    if os.getppid() != watched:
        sys.exit(0)
    if ppid(watched) != parent:
        os.kill(watched, signal.SIGKILL)
        sys.exit(0)
"""


def exit_with_parent(interval_s: float = 1.0) -> subprocess.Popen:
    """Start a watcher process that SIGKILLs this process once its parent process is gone."""
    # NOTE: the watcher exits by itself when this process ends, however it ends.
    return subprocess.Popen(
        [_python(), "-S", "-c", _WATCHER, str(os.getpid()), str(os.getppid()), str(interval_s)],
        stdin=subprocess.DEVNULL, close_fds=True, start_new_session=False,
    )


def _python() -> str:
    # NOTE: inside Triton's backend stub, sys.executable is the stub binary (or empty); the stub
    # itself finds the interpreter as the first python3 on PATH, and so does this.
    name = os.path.basename(sys.executable or "")
    if name.startswith("python"):
        return sys.executable
    return shutil.which("python3") or "python3"


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


def accepts(host: str, port: int, timeout: float = 2.0) -> bool:
    """Whether something accepts a TCP connection on host:port now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


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
