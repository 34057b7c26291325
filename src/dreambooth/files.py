"""Atomic file writes: a reader (or a restarted run) sees the old file or the new one, never half."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def with_usual_permissions(path: Path) -> Path:
    """Give the .safetensors file `path`, or each one under the folder `path`, the mode a plain `open()` gives
    a new file (0o666 less the umask); return `path`.

    safetensors 0.8 writes through a temporary file created 0600 (safetensors issue #782): weights saved by
    one user, or by root in a container, could not be read by another user or a UI's service account.
    """
    files = [path] if path.is_file() else path.rglob("*.safetensors")
    mode = 0o666 & ~_UMASK
    for file in files:
        if file.suffix == ".safetensors" and not file.is_symlink():
            os.chmod(file, mode)
    return path


def _read_umask() -> int:
    """The process's umask. Reading it means setting it, so this runs once, at import, before any thread
    writes files: a file created meanwhile in another thread would get the temporary mask."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def safetensors_keys(path: Path, what: str) -> list[str]:
    """The tensor names in a .safetensors file's header (no tensor is read).

    Raises:
        ValueError: naming `what` (e.g. "--lora:") and the file, if the header cannot be read.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            return list(handle.keys())
    except Exception as error:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"{what} {str(path)!r} is not a readable .safetensors file ({error})") from error
