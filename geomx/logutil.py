"""Logging with the node's role and rank in every line."""
from __future__ import annotations

import logging
import sys

_label = "geomx"


class _LabelFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.node = _label
        return True


def set_label(label: str) -> None:
    """Name this process in every later log line (e.g. ``local_server0``)."""
    global _label
    _label = label


def setup(verbose: int = 0, label: str = "geomx") -> None:
    """Configure the ``geomx`` logger once: stderr, timestamps, node label. PS_VERBOSE >= 1 → DEBUG."""
    set_label(label)
    logger = logging.getLogger("geomx")
    if getattr(logger, "_geomx_configured", False):
        logger.setLevel(logging.DEBUG if verbose else logging.INFO)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_LabelFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(node)s] %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger._geomx_configured = True  # type: ignore[attr-defined]
