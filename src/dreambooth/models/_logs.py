"""Dropping one known, harmless diffusers warning while a call runs; the logger's other messages still
show."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def without_warning(logger_name: str, starts_with: str) -> Iterator[None]:
    """Inside the block, drop the records of logger `logger_name` whose message starts with `starts_with`."""
    logger = logging.getLogger(logger_name)

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(starts_with)

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)
