"""Run one command and print its wall time, peak RSS and (with `nvidia-smi`) peak GPU memory.

    python bench/timed.py LABEL -- COMMAND [ARGS ...]

The same measurement as bench/vs_diffusers.py's (bench/_timing.py): a fresh child process, nothing
inside it. Its output goes to bench/.cache/timed/LABEL/; a failure prints the end of its stderr.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from _timing import run_timed, tail

LOGS = Path(__file__).resolve().parent / ".cache" / "timed"


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        raise SystemExit(__doc__)
    label, command = sys.argv[1], sys.argv[3:]
    timed = run_timed(command, dict(os.environ), LOGS / label)
    if timed.returncode != 0:
        raise SystemExit(
            f"{label}: exit code {timed.returncode}\n{tail(LOGS / label / 'stderr.txt')}"
        )
    gpu = f", peak GPU {timed.peak_gpu_mb:.0f} MB (nvidia-smi)" if timed.peak_gpu_mb is not None else ""
    print(f"{label}: {timed.wall_s:.1f} s, peak RSS {timed.peak_rss_mb:.0f} MB{gpu}", flush=True)


if __name__ == "__main__":
    main()
