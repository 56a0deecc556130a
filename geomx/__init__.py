"""geomx: geo-distributed training over a two-tier (hierarchical) parameter server.

The core (servers, schedulers, codecs, the worker's client, :mod:`geomx.store`) needs numpy and pyzmq
only. Two front ends sit on it:

* MXNet 1.9 (``pip install geomx[mxnet]``): ``import geomx`` in a training script makes
  ``mx.kv.create("dist_sync")`` / ``"dist_async"`` return geomx's store (:mod:`geomx.kvstore`), whether
  the script imports mxnet before or after geomx.
* PyTorch (``pip install geomx[torch]``): :mod:`geomx.torch` (``DistributedOptimizer``).

Non-worker roles run ``python -m geomx.node``; ``geomx-launch`` starts a whole topology.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any, Optional, Sequence

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


class _RegisterAfterLoad(importlib.abc.Loader):
    """MXNet's own loader, then :func:`register` once the ``mxnet`` package has run (its ``__init__``
    imports ``mxnet.kvstore``, where the registry lives)."""

    def __init__(self, loader: Any):
        self._loader = loader

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        if "geomx.kvstore" not in sys.modules:  # else it is importing mxnet and registers at its end
            register()

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, ...: MXNet's loader's
        return getattr(self._loader, name)


class _MXNetImportHook(importlib.abc.MetaPathFinder):
    """Registers geomx's store when a worker first imports mxnet, before or after ``import geomx``.

    Importing MXNet ourselves instead would cost a framework-free (PyTorch) worker an MXNet it does not
    use, or fail where none is installed; a hook costs nothing until ``import mxnet``."""

    def find_spec(self, name: str, path: Optional[Sequence[str]], target: Any = None) -> Any:
        if name != "mxnet":
            return None
        sys.meta_path.remove(self)  # once; the lookup below goes through the other finders as usual
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterLoad(spec.loader)
        return spec


# Server and scheduler processes must not import mxnet at all: with DMLC_ROLE=server/scheduler set,
# MXNet starts its own ps-lite node on import and never returns (geomx.node hides those variables first
# where it may need MXNet's optimizers).
if "mxnet" in sys.modules:
    register()
elif config.is_worker_process() and not any(isinstance(f, _MXNetImportHook) for f in sys.meta_path):
    sys.meta_path.insert(0, _MXNetImportHook())
