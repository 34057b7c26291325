"""Time a program as a child process: wall time around it, its own peak RSS and, where `nvidia-smi` is
found, the GPU's peak memory while it ran; nothing inside the program."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
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
    peak_gpu_mb: float | None = None
    """The most memory GPU 0 had in use while the process ran, less what it had in use before (MB, from
    `nvidia-smi` every 50 ms: the CUDA context included, as a user's `nvidia-smi` shows it); None
    without `nvidia-smi`."""


def run_timed(cmd: list[str], env: dict[str, str], log_dir: Path) -> Timed:
    """Run `cmd` with stdout and stderr in `log_dir`/stdout.txt and stderr.txt (files, so a full pipe
    never stalls it), and reap it with wait4 to read the resources of that very process."""
    log_dir.mkdir(parents=True, exist_ok=True)
    gpu = _GpuMemory() if shutil.which("nvidia-smi") else None
    with open(log_dir / "stdout.txt", "wb") as out, open(log_dir / "stderr.txt", "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    # ru_maxrss is in KiB on Linux
    return Timed(
        wall, usage.ru_maxrss * 1024 / 1e6, usage.ru_utime + usage.ru_stime, proc.returncode,
        gpu.stop() if gpu else None,
    )


class _GpuMemory:
    """Samples GPU 0's used memory with `nvidia-smi` in a thread until `stop`."""

    def __init__(self, every_s: float = 0.05) -> None:
        self.baseline = self.peak = _gpu_used_mb()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(every_s,), daemon=True)
        self._thread.start()

    def _sample(self, every_s: float) -> None:
        while not self._done.wait(every_s):
            self.peak = max(self.peak, _gpu_used_mb())

    def stop(self) -> float:
        self._done.set()
        self._thread.join()
        return self.peak - self.baseline


def _gpu_used_mb() -> float:
    result = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "--id=0"],
        capture_output=True, text=True, check=True,
    )
    return float(result.stdout.split()[0]) * 1.048576  # MiB -> MB


def tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a log, with progress-bar redraws (carriage returns) collapsed."""
    text = path.read_text(errors="replace") if path.exists() else ""
    kept = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
    return "\n".join(kept[-lines:])


def load_average() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]
