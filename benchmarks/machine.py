"""Facts about the machine and the processes a run uses: CPU model, threads, CPU seconds, bandwidth."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from lepton.memory import advise_huge_pages, transparent_huge_pages

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def machine_info() -> dict:
    """nproc, CPU model, memory, library versions and the client's torch threads."""
    import torch
    import transformers

    cpu_model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), "unknown",
    )
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    return {
        "nproc": os.cpu_count(),
        "sched_affinity": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "mem_gib": round(mem_kb / (1 << 20), 1),
        "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads_client": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "tritonclient": importlib.metadata.version("tritonclient"),
        "kernel": platform.release(),
        "transparent_hugepage": transparent_huge_pages(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    }


def read_bandwidth_gbps(num_bytes: int = 512 << 20, repeats: int = 5) -> dict:
    """Best-of-repeats memory read rate of a torch float32 sum, with 1 thread and with all threads; the
    buffer in transparent huge pages where the kernel gives them, as Lepton's engines hold their weights
    (lepton.memory.advise_huge_pages): in 4 KiB pages the same sum read a fifth less on this project's EPYC."""
    import torch

    data = torch.ones(num_bytes // 4, dtype=torch.float32)
    advise_huge_pages()
    result = {}
    threads = torch.get_num_threads()
    for label, n in (("1_thread", 1), ("all_threads", threads)):
        torch.set_num_threads(n)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            data.sum()
            best = min(best, time.perf_counter() - start)
        result[label] = round(num_bytes / best / 1e9, 2)
    torch.set_num_threads(threads)
    return result


def process_tree_cpu_s(root_pid: int) -> float:
    """User + system CPU seconds of root_pid and its live descendants (tritonserver and its stub)."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry.name)
        stats[pid] = fields
        children.setdefault(int(fields[1]), []).append(pid)
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += int(stats[pid][11]) + int(stats[pid][12])  # utime, stime
        todo.extend(children.get(pid, []))
    return total / CLOCK_TICKS


def code_version(root: Path, paths: tuple[str, ...] = ("lepton", "model_repository")) -> dict:
    """HEAD commit and the uncommitted files under paths (read-only git calls; {} without git)."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", "--no-optional-locks", *args], cwd=root, capture_output=True,
                              text=True, check=True).stdout.rstrip("\n")

    try:
        return {"head": git("rev-parse", "--short", "HEAD"),
                "uncommitted": git("status", "--porcelain", "--", *paths).splitlines()}
    except (OSError, subprocess.CalledProcessError):
        return {}


@dataclass(frozen=True)
class TreeUsage:
    """Memory and threads of a process and its live descendants (tritonserver and its backend stubs)."""

    rss_bytes: int  # summed VmRSS
    threads: int  # summed Threads
    processes: dict[int, tuple[str, int, int]]  # pid -> (name, rss bytes, threads)


def process_tree_usage(root_pid: int) -> TreeUsage:
    """VmRSS and Threads from /proc/<pid>/status of root_pid and every process below it."""
    from lepton.lifetime import descendants

    processes = {}
    for pid in [root_pid, *descendants(root_pid)]:
        try:
            status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
        except OSError:  # NOTE: it exited since the listing
            continue
        rss_kb = int(status.get("VmRSS", "0 kB").split()[0])
        processes[pid] = (status["Name"].strip(), rss_kb * 1024, int(status["Threads"]))
    return TreeUsage(sum(p[1] for p in processes.values()), sum(p[2] for p in processes.values()), processes)


def listening_pid(port: int) -> int | None:
    """The process with a TCP socket listening on port (from /proc/net/tcp{,6}); None when not found."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # NOTE: 0A is LISTEN
                    inodes.add(f"socket:[{fields[9]}]")
    for entry in Path("/proc").iterdir():
        if inodes and entry.name.isdigit():
            with contextlib.suppress(OSError):
                if any(os.readlink(fd) in inodes for fd in (entry / "fd").iterdir()):
                    return int(entry.name)
    return None
