"""Structured loggers for checkpoint events (Orbax's ``ocp.logging``).

A :class:`~ckpt_async.CheckpointManager` built with ``logger=`` calls its ``log_entry`` once
per save (when ``save()`` returns) and once per restore, with a dict of
:class:`~ckpt_async.logging.step_statistics.SaveStepStatistics` or
:class:`~ckpt_async.logging.step_statistics.RestoreStepStatistics` fields.
"""

from __future__ import annotations

import abc
import logging
from typing import Any

from . import step_statistics

log = logging.getLogger("ckpt_async")


class AbstractLogger(abc.ABC):
    """Takes structured log entries (Orbax's ``AbstractLogger``)."""

    @abc.abstractmethod
    def log_entry(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        """Logs one entry."""


class StandardLogger(AbstractLogger):
    """Logs each entry at INFO level to the ``ckpt_async`` Python logger."""

    def log_entry(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        log.info(msg, *args, **kwargs)


class CompositeLogger(AbstractLogger):
    """Hands each entry to every one of ``loggers`` (others than AbstractLoggers, and other
    CompositeLoggers, are left out with a warning, as in Orbax)."""

    def __init__(self, *loggers: AbstractLogger) -> None:
        self._loggers: list[AbstractLogger] = []
        for logger in loggers:
            if not isinstance(logger, AbstractLogger) or isinstance(logger, CompositeLogger):
                log.warning("CompositeLogger takes AbstractLoggers other than CompositeLoggers; "
                            "%r left out", logger)
                continue
            self._loggers.append(logger)

    def log_entry(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        for logger in self._loggers:
            logger.log_entry(msg, *args, **kwargs)


__all__ = ["AbstractLogger", "CompositeLogger", "StandardLogger", "step_statistics"]
