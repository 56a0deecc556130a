"""The MXNet front end: ``GeoKVStore``, what ``mx.kv.create("dist_sync")`` returns after ``import geomx``.

It adapts MXNet's KVStore interface (NDArrays, lists of device copies, string keys) onto the
framework-neutral :class:`geomx.store.Store`. Calls are pipelined like MXNet's own store: ``push`` sends
and returns; ``pull`` / ``pushpull`` send and return at once, and the result is written into ``out`` by
an engine operation that waits for the reply, so any later read of ``out`` (the next forward pass,
``asnumpy()``) waits for it and nothing else does. A step of an N-parameter model therefore costs about
one round trip, not N.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

try:
    import mxnet as mx
    from mxnet.kvstore.base import KVStoreBase
except ImportError as exc:  # the core installs without a framework
    raise ImportError("geomx's MXNet front end needs MXNet 1.9.1: pip install 'geomx[mxnet]' (Python 3.9-3.12)") \
        from exc

from . import delivery, store
from .errors import GeoMXError
from .optimizer_spec import optimizer_from_spec, optimizer_to_spec
from .store import Store, key_id

log = logging.getLogger("geomx.kvstore")

# -- key and value normalisation ---------------------------------------------------------------------

def _as_list(x: Any) -> List[Any]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _pairs(key: Any, value: Any) -> List[Tuple[Any, List[mx.nd.NDArray]]]:
    """(key, [arrays]) pairs from MXNet's accepted forms: one key with an array or a list of device
    copies, or a list of keys with a list of arrays (or of lists of device copies)."""
    if value is None:
        return [(k, []) for k in _as_list(key)]
    if isinstance(key, (list, tuple)):
        values = _as_list(value)
        if len(values) != len(key):
            raise GeoMXError(f"{len(key)} keys but {len(values)} values")
        return [(k, _as_list(v)) for k, v in zip(key, values)]
    return [(key, _as_list(value))]


def _flat(arrays: Sequence[mx.nd.NDArray]) -> np.ndarray:
    """One host array: the sum of the device copies (as MXNet's store reduces them)."""
    if len(arrays) == 1:
        return arrays[0].asnumpy().reshape(-1)
    return mx.nd.add_n(*[a.as_in_context(mx.cpu()) for a in arrays]).asnumpy().reshape(-1)


class _ShadowUpdater:
    """What gluon.Trainer reads back after ``load_states``: ``kv._updater.optimizer``."""

    def __init__(self, optimizer: Any):
        self.optimizer = optimizer


# -- the store ---------------------------------------------------------------------------------------

class GeoKVStore(KVStoreBase):
    """A worker's handle on the hierarchical parameter server, as MXNet's KVStore interface.

    ``rank`` and ``num_workers`` are those of the worker's own party (as in GeoMX); ``num_all_workers``
    counts training workers worldwide; ``is_master_worker`` is the central party's coordinating worker.
    """

    _default_type = "dist_sync"

    def __init__(self, kvtype: Optional[str] = None):
        self._type = kvtype or self._default_type
        # dist_sync: synchronous global tier; dist_async: MixedSync (asynchronous across parties).
        self._store = Store(sync="async" not in self._type, what=f"mx.kv.create({self._type!r})")
        self._shapes: Dict[int, Tuple[int, ...]] = {}
        self._updater: Optional[_ShadowUpdater] = None
        store.on_exit_close(self._store, self._close)

    # -- properties -----------------------------------------------------------------------------
    @property
    def type(self) -> str:
        return self._type

    @property
    def rank(self) -> int:
        return self._store.rank

    @property
    def num_workers(self) -> int:
        return self._store.num_workers

    @property
    def num_all_workers(self) -> int:
        return self._store.num_all_workers

    @property
    def is_master_worker(self) -> bool:
        return self._store.is_master_worker

    @property
    def hfa_periods(self) -> Tuple[int, int]:
        """HFA's (K1, K2) from MXNET_KVSTORE_HFA_K1/K2; (1, 1) when HFA is off."""
        return self._store.hfa_periods

    def esync_steps(self) -> int:
        """ESync (GEOMX_USE_ESYNC=1): how many local steps this worker takes before its next pushpull
        (:meth:`geomx.store.Store.esync_steps`)."""
        return self._store.esync_steps()

    @staticmethod
    def is_capable(capability: str) -> bool:
        return capability.lower() == KVStoreBase.OPTIMIZER

    def _meta(self, key: Any) -> Tuple[int, Tuple[int, ...]]:
        kid = key_id(key)
        try:
            return kid, self._shapes[kid]
        except KeyError:
            raise GeoMXError(f"key {key!r} was not initialised with kv.init") from None

    # -- key-value API --------------------------------------------------------------------------
    def init(self, key: Any, value: Any) -> None:
        for fut, _ in self._init(key, value):
            fut.result()

    def _init(self, key: Any, value: Any) -> List[Tuple[Any, int]]:
        self._store.check()
        futures = []
        for k, arrays in _pairs(key, value):
            if not arrays:
                raise GeoMXError(f"kv.init({k!r}) needs a value")
            kid = key_id(k)
            arr = arrays[0]
            self._shapes[kid] = tuple(arr.shape)
            # Only the master worker's values count: every party starts from the global servers' copy.
            data = arr.asnumpy() if self.is_master_worker else None
            futures.append((self._store.init(kid, int(np.prod(arr.shape)), arr.dtype, data), kid))
        return futures

    def broadcast(self, key: Any, value: Any, out: Any, priority: int = 0) -> None:
        futures = self._init(key, value)
        outs = [o for _, o in _pairs(key, out)]
        for (fut, kid), targets in zip(futures, outs):
            result = fut.result().reshape(self._shapes[kid])
            for o in targets:
                # copyto, not o[:] = numpy: parameters may be held in an MKLDNN layout.
                mx.nd.array(result, dtype=o.dtype, ctx=o.context).copyto(o)

    def push(self, key: Any, value: Any, priority: int = 0) -> None:
        self._store.check()
        for k, arrays in _pairs(key, value):
            kid, _ = self._meta(k)
            self._store.push(kid, _flat(arrays), priority)

    def pull(self, key: Any, out: Any = None, priority: int = 0, ignore_sparse: bool = True) -> None:
        self._store.check()
        if out is None:
            raise GeoMXError("kv.pull needs out=")
        for k, targets in _pairs(key, out):
            kid, _ = self._meta(k)
            fut = self._store.pull(kid, priority)
            for o in targets:
                delivery.deliver(fut, o, priority)

    def pushpull(self, key: Any, value: Any, out: Any = None, priority: int = 0) -> None:
        self._store.check()
        outs = _pairs(key, out) if out is not None else _pairs(key, value)
        for (k, arrays), (_, targets) in zip(_pairs(key, value), outs):
            kid, _ = self._meta(k)
            fut = self._store.pushpull(kid, _flat(arrays), priority)
            for o in targets:
                delivery.deliver(fut, o, priority)

    def barrier(self) -> None:
        self._store.barrier()

    def _barrier(self) -> None:  # name used by some MXNet code paths
        self.barrier()

    # -- optimizer and compression --------------------------------------------------------------
    def set_optimizer(self, optimizer: Any) -> None:
        """Send ``optimizer`` (as its registered name and hyper-parameters) to the global servers."""
        self._store.check()
        self._store.set_optimizer(optimizer_to_spec(optimizer))
        self._updater = _ShadowUpdater(optimizer)

    def set_gradient_compression(self, compression_params: Dict[str, Any]) -> None:
        """Choose how gradients cross the WAN (:meth:`geomx.store.Store.set_compression`):
        ``{"type": "bsc", "threshold": 0.01}``, ``"fp16"``, ``"mpq"`` or ``"none"``; it takes effect
        when the master worker calls it (before ``kv.init``), as in GeoMX."""
        self._store.set_compression(compression_params)

    def report_loss(self, loss: float) -> None:
        """Tell the party's local server this worker's training loss (:meth:`geomx.store.Store.report_loss`;
        DGT's ``ADAPTIVE_K_FLAG=1`` uses it)."""
        self._store.report_loss(loss)

    def report_accuracy(self, accuracy: float) -> None:
        """This worker's latest accuracy in [0, 1], for its metrics and the status page
        (:meth:`geomx.store.Store.report_accuracy`)."""
        self._store.report_accuracy(accuracy)

    def report_progress(self, step: int, total: Optional[int] = None) -> None:
        """Steps done of ``total`` planned, for the metrics and the launcher's ETA
        (:meth:`geomx.store.Store.report_progress`)."""
        self._store.report_progress(step, total)

    def save_optimizer_states(self, fname: str, dump_optimizer: bool = False) -> None:
        """Save the global servers' optimizer states to ``fname`` (an .npz file without pickles)."""
        self._store.save_optimizer_states(fname)

    def save_checkpoint(self) -> List[Dict[str, Any]]:
        """Ask every global server to checkpoint now (:meth:`geomx.store.Store.save_checkpoint`)."""
        return self._store.save_checkpoint()

    def load_optimizer_states(self, fname: str) -> None:
        """Load states saved by :meth:`save_optimizer_states` into the global servers."""
        spec = self._store.load_optimizer_states(fname)
        if spec and self._updater is None:
            self._updater = _ShadowUpdater(optimizer_from_spec(spec))

    # -- shutdown -------------------------------------------------------------------------------
    def close(self) -> None:
        """Finish outstanding requests and leave the topology (also done at interpreter exit)."""
        self._close(failure=None)

    def _close(self, failure: Optional[str]) -> None:
        # MXNet's engine may still hold delivery operations writing pulled values: let them finish.
        self._store.close_with(failure, before_leaving=mx.nd.waitall)

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


def _mxnet_failure(value: BaseException) -> Optional[str]:
    """An MXNetError raised by a delivery op carries the whole Python traceback of the geomx error
    behind it: name that error instead."""
    if not isinstance(value, mx.base.MXNetError):
        return None
    lines = [line.strip() for line in str(value).splitlines() if line.strip()]
    causes = [line for line in lines if line.startswith("geomx.errors.")]
    if causes:
        return causes[-1][len("geomx.errors."):]
    if lines:
        # The failed check itself, without the traceback lines.
        return lines[-1] if lines[-1].startswith("MXNetError") else f"MXNetError: {lines[-1]}"
    return None


store.failure_summaries.append(_mxnet_failure)


def _make(kvtype: str) -> type:
    return type(f"GeoKVStore_{kvtype}", (GeoKVStore,), {"_default_type": kvtype})


def register() -> None:
    """Make ``mx.kv.create`` return geomx's store for the distributed types."""
    for kvtype in ("dist_sync", "dist_async", "dist_sync_device", "dist_async_device", "dist"):
        KVStoreBase.kv_registry[kvtype] = _make(kvtype)


# Importing the MXNet front end is asking for it (``import geomx`` does it when mxnet is imported).
register()


def initialize_trainer(trainer: Any) -> None:
    """On the master worker: send ``trainer``'s optimizer to the global servers (when it updates on
    the store) and initialise every parameter there, without taking a training step.

    Party workers need not call it: their trainer's first ``step`` fetches the master's values.
    """
    if not trainer._kv_initialized:
        trainer._init_kvstore()
    if trainer._params_to_init:
        trainer._init_params()
