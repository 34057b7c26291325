"""Opening a run folder: refuse to clobber, resume only on request, record the resolved config.

Opening only checks (and creates an empty folder, which `removed_if_left_empty` takes away again if
the command fails with it still empty): nothing in it is written until the caller records the
config, so a command that fails before that leaves a resumed run as it was.

`config.resolved.toml` holds every value the run uses (`config.resolve`): the learning rates
resolved from the method's defaults, the run folder, and the identifier once it is chosen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

from dreambooth._config_io import from_dict, load_file, save_toml, to_dict
from dreambooth.config import RunConfig, resolve
from dreambooth.layout import RunLayout

logger = logging.getLogger(__name__)


def open_run_folder(cfg: RunConfig) -> tuple[RunLayout, bool]:
    """Create or reopen `cfg.run_dir` as the flags ask; return its layout and whether this resumes.

    Writes nothing in an existing folder (--overwrite empties it); `record_config` does.

    Raises:
        ValueError: if the folder exists and neither --resume nor --overwrite was given, or it
            cannot be written.
    """
    layout = RunLayout(cfg.run_dir)
    exists = _holds_run(layout)
    if exists and not (cfg.output.resume or cfg.output.overwrite):
        raise ValueError(
            f"run folder {str(layout.root)!r} already exists{_describe(layout)}. "
            "Pass --resume to continue it, --overwrite to start over, or --run-dir for a new folder"
        )
    if exists and cfg.output.overwrite:
        shutil.rmtree(layout.root)
    if cfg.output.resume and not exists:
        logger.warning("--resume: %s holds no run yet; starting a new one", layout.root)
    _check_writable(layout.root)
    resuming = exists and cfg.output.resume
    if resuming and layout.config.is_file():
        _warn_config_changes(layout.config, cfg)
    return layout, resuming


@contextlib.contextmanager
def removed_if_left_empty(folder: Path) -> Iterator[None]:
    """If `folder` does not exist yet and the block fails leaving it empty, remove it: a command that fails
    leaves no trace of a run it never started."""
    existed = folder.exists()
    try:
        yield
    except BaseException:
        if not existed:
            with contextlib.suppress(OSError):  # not empty (reusable class images), or already gone
                folder.rmdir()
        raise


def record_config(layout: RunLayout, cfg: RunConfig, identifier: str | None = None) -> None:
    """Write the run's config.resolved.toml, with the identifier the run uses (chosen or resumed)."""
    save_toml(resolve(cfg, identifier), layout.config)


def _holds_run(layout: RunLayout) -> bool:
    """Whether a run was recorded in the folder: a start that failed before training leaves only
    reusable parts (its class images, an error log), and the folder is then opened as new."""
    return (
        layout.config.is_file() or layout.run_info.is_file()
        or any((layout.root / "checkpoints").glob("*/step-*"))
    )


def _describe(layout: RunLayout) -> str:
    steps = sorted(p.name for p in (layout.root / "checkpoints").glob("*/step-*"))
    return f" with checkpoints up to {steps[-1]}" if steps else ""


def _check_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise ValueError(
            f"cannot write to run folder {str(root)!r} ({error.strerror}): choose another --run-dir"
        ) from error


def _warn_config_changes(path: Path, cfg: RunConfig) -> None:
    """Name every setting that differs from the run being resumed; the new values win."""
    try:
        # a run folder from before values were resolved
        old = to_dict(resolve(from_dict(RunConfig, load_file(path))))
    except ValueError:
        logger.warning("could not read the previous config %s; using the new one", path)
        return
    new = to_dict(
        resolve(
            dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, resume=False, overwrite=False))
        )
    )
    old["output"] = {**old.get("output", {}), "resume": False, "overwrite": False}
    if cfg.identifier.identifier is None:  # left to choose: the run keeps its own (finetune says so)
        old.get("identifier", {}).pop("identifier", None)
    for section in sorted(set(old) | set(new)):
        before, after = old.get(section, {}), new.get(section, {})
        if not isinstance(before, dict):
            continue
        for key in sorted(set(before) | set(after)):
            if before.get(key) != after.get(key):
                logger.warning(
                    "resume: %s.%s was %r, now %r; the new value is used", section, key, before.get(key),
                    after.get(key),
                )
