"""Time a program as a child process: wall time around it and its own peak RSS, with nothing inside it."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Timed:
    wall_s: float
    """From just before the process starts to just after it is reaped: interpreter start-up included."""
    peak_rss_mb: float
    """`ru_maxrss` of the process itself (wait4 on its pid), in MB (10**6 bytes)."""
    cpu_s: float
    """User + system CPU time of the process: far above the wall time x threads when it had to wait for the
    CPUs."""
    returncode: int


def run_timed(cmd: list[str], env: dict[str, str], log_dir: Path) -> Timed:
    """Run `cmd` with stdout and stderr in `log_dir`/stdout.txt and stderr.txt (files, so a full pipe
    never stalls it), and reap it with wait4 to read the resources of that very process."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "stdout.txt", "wb") as out, open(log_dir / "stderr.txt", "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    # ru_maxrss is in KiB on Linux
    return Timed(wall, usage.ru_maxrss * 1024 / 1e6, usage.ru_utime + usage.ru_stime, proc.returncode)


def tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a log, with progress-bar redraws (carriage returns) collapsed."""
    text = path.read_text(errors="replace") if path.exists() else ""
    kept = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
    return "\n".join(kept[-lines:])


def load_average() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]
