"""geomx: geo-distributed training on stock MXNet 1.9 over a two-tier (hierarchical) parameter server.

``import geomx`` in a training script makes ``mx.kv.create("dist_sync")`` / ``"dist_async"`` return
geomx's store. Non-worker roles run ``python -m geomx.node``; ``python -m geomx.launch`` starts a whole
topology on one machine.
"""
from __future__ import annotations

import sys

from . import config

__version__ = "0.1.0"


def register() -> None:
    """Register geomx's store with MXNet (imports mxnet). Safe to call more than once."""
    from .kvstore import register as _register

    _register()


def initialize_trainer(trainer) -> None:  # noqa: ANN001 - gluon.Trainer
    """See :func:`geomx.kvstore.initialize_trainer` (master worker: optimizer + initial values)."""
    from .kvstore import initialize_trainer as _init

    _init(trainer)


# Worker processes (and any process that already imported mxnet) get the store registered on import.
# Server and scheduler processes must not import mxnet at all: with DMLC_ROLE=server/scheduler set,
# MXNet starts its own ps-lite node on import and never returns.
if config.is_worker_process() or "mxnet" in sys.modules:
    register()
