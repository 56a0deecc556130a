"""Logging with the node's role and rank in every line, without taking over the application's logging.

Two ways in:

* :func:`setup` is for processes geomx owns (``geomx-node``, and an application that asks for it): the
  ``geomx`` logger gets its own stderr handler with the node's label and stops propagating.
* :func:`setup_default` is what a worker's kvstore calls inside the user's training script. It never
  touches the root logger or a handler the application installed. Only while the application has
  configured no handler that would take geomx's records does a fallback handler print them, labelled,
  on stderr (Python itself would print only warnings, without time or level); as soon as the
  application configures logging (before or after creating the kvstore), geomx's records go to its
  handlers instead, and the fallback stays silent. The ``geomx`` logger's level is set only if the
  application left it unset and had configured nothing, or if ``PS_VERBOSE`` asks for debug output.
"""
from __future__ import annotations

import logging
import sys

_label = "geomx"
_FORMAT = "%(asctime)s %(levelname)s [%(node)s] %(message)s"


class _LabelFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.node = _label
        return True


def set_label(label: str) -> None:
    """Name this process in every later log line (e.g. ``local_server0``)."""
    global _label
    _label = label


def _labelled(handler: logging.Handler) -> logging.Handler:
    handler.addFilter(_LabelFilter())
    handler.setFormatter(logging.Formatter(_FORMAT, "%H:%M:%S"))
    return handler


def setup(verbose: int = 0, label: str = "geomx") -> None:
    """Configure the ``geomx`` logger once: stderr, timestamps, node label. PS_VERBOSE >= 1 → DEBUG.

    For processes geomx owns; inside an application, :func:`setup_default` (what the kvstore does)
    leaves logging to the application, and calling this instead opts in to geomx's own handler."""
    set_label(label)
    logger = logging.getLogger("geomx")
    if getattr(logger, "_geomx_configured", False):
        logger.setLevel(logging.DEBUG if verbose else logging.INFO)
        return
    logger.addHandler(_labelled(logging.StreamHandler(sys.stderr)))
    logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger._geomx_configured = True  # type: ignore[attr-defined]


class _FallbackHandler(logging.StreamHandler):
    """geomx's records on stderr, only while no other handler on the record's way would take them."""

    def emit(self, record: logging.LogRecord) -> None:
        if not _handled_elsewhere(record):
            super().emit(record)


def _handled_elsewhere(record: logging.LogRecord) -> bool:
    """Whether a handler other than geomx's fallback is on the path ``record`` propagates along."""
    logger: logging.Logger | None = logging.getLogger(record.name)
    while logger is not None:
        if any(not isinstance(h, _FallbackHandler) for h in logger.handlers):
            return True
        if not logger.propagate:
            return False
        logger = logger.parent  # type: ignore[assignment]
    return False


def setup_default(verbose: int = 0, label: str = "geomx") -> None:
    """Inside an application: labelled stderr output only where the application configured none."""
    set_label(label)
    logger = logging.getLogger("geomx")
    if getattr(logger, "_geomx_configured", False):  # the application opted in to setup()
        if verbose:
            logger.setLevel(logging.DEBUG)
        return
    configured = bool(logging.getLogger().handlers) or bool(logger.handlers)
    if verbose:
        logger.setLevel(logging.DEBUG)
    elif logger.level == logging.NOTSET and not configured:
        logger.setLevel(logging.INFO)
    if not configured and not any(isinstance(h, _FallbackHandler) for h in logger.handlers):
        logger.addHandler(_labelled(_FallbackHandler(sys.stderr)))
