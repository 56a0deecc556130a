"""The MXNet front end: ``GeoKVStore``, what ``mx.kv.create("dist_sync")`` returns after ``import geomx``.

Calls are pipelined like MXNet's own store: ``push`` sends and returns; ``pull`` / ``pushpull`` send
and return at once, and the result is written into ``out`` by an engine operation that waits for the
reply, so any later read of ``out`` (the next forward pass, ``asnumpy()``) waits for it and nothing
else does. A step of an N-parameter model therefore costs about one round trip, not N.
"""
from __future__ import annotations

import atexit
import concurrent.futures as cf
import hashlib
import json
import logging
import math
import sys
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np
from mxnet.kvstore.base import KVStoreBase

from . import commands, config, delivery, logutil
from .errors import ConfigError, GeoMXError
from .optimizer_spec import optimizer_from_spec, optimizer_to_spec
from .wire import MsgType
from .worker import WorkerNode

log = logging.getLogger("geomx.kvstore")

# -- key and value normalisation ---------------------------------------------------------------------

def _key_id(key: Any) -> int:
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        if key < 0 or key >= 1 << 62:
            raise GeoMXError(f"integer keys must be in [0, 2**62), got {key}")
        return int(key)
    if isinstance(key, str):
        # String keys (Module.fit) map to a stable id every process computes alike.
        return (1 << 62) | int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") \
            & ((1 << 62) - 1)
    raise GeoMXError(f"keys must be int or str, got {type(key).__name__}")


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
    """A worker's handle on the hierarchical parameter server.

    ``rank`` and ``num_workers`` are those of the worker's own party (as in GeoMX); ``num_all_workers``
    counts training workers worldwide; ``is_master_worker`` is the central party's coordinating worker.
    """

    _default_type = "dist_sync"

    def __init__(self, kvtype: Optional[str] = None):
        self._type = kvtype or self._default_type
        cfg = config.load()
        if cfg.role != config.WORKER:
            raise ConfigError(f"mx.kv.create({self._type!r}) is for workers; this process has role {cfg.role} "
                              "(run non-worker roles with `python -m geomx.node`)")
        logutil.setup_default(cfg.verbose, "master_worker" if cfg.is_master_worker else "worker")
        self._cfg = cfg
        self._node = WorkerNode(cfg)
        logutil.set_label(("master_worker" if cfg.is_master_worker else "worker") + str(self._node.rank))
        self._shapes: Dict[int, Tuple[Tuple[int, ...], np.dtype]] = {}
        self._inflight: List[cf.Future] = []
        self._updater: Optional[_ShadowUpdater] = None
        self._last_pushpull: Dict[int, cf.Future] = {}
        self._closed = False
        if cfg.is_master_worker:
            # dist_sync: synchronous global tier; dist_async: MixedSync (asynchronous across parties).
            try:
                self._command({"cmd": commands.SYNC_MODE, "sync": "async" not in self._type})
            except GeoMXError as exc:
                # Refused (e.g. HFA with dist_async): tell the topology now rather than let it wait.
                self._node.close(failure=str(exc))
                raise
        _live_stores.add(self)

    # -- properties -----------------------------------------------------------------------------
    @property
    def type(self) -> str:
        return self._type

    @property
    def rank(self) -> int:
        return self._node.rank

    @property
    def num_workers(self) -> int:
        return self._cfg.num_worker

    @property
    def num_all_workers(self) -> int:
        return self._cfg.num_all_worker

    @property
    def is_master_worker(self) -> bool:
        return self._cfg.is_master_worker

    @property
    def hfa_periods(self) -> Tuple[int, int]:
        """HFA's (K1, K2) from MXNET_KVSTORE_HFA_K1/K2; (1, 1) when HFA is off."""
        return (self._cfg.hfa.k1, self._cfg.hfa.k2) if self._cfg.hfa.enabled else (1, 1)

    def esync_steps(self) -> int:
        """ESync (GEOMX_USE_ESYNC=1): how many local steps this worker takes before its next pushpull.

        The global server assigns each party a count from its measured speed, so that fast and slow
        parties reach the global round at about the same time; 1 until speeds are known. Waits for the
        latest pushpull of key 0, which carries the assignment.
        """
        fut = self._last_pushpull.get(0)
        if fut is not None:
            fut.result()
        steps = self._node.reply_meta.get(0, {}).get("esync_steps", 1)
        return steps if isinstance(steps, int) and steps >= 1 else 1

    @staticmethod
    def is_capable(capability: str) -> bool:
        return capability.lower() == KVStoreBase.OPTIMIZER

    # -- helpers --------------------------------------------------------------------------------
    def _check(self) -> None:
        if self._closed:
            raise GeoMXError("this kvstore is closed")
        done = [f for f in self._inflight if f.done()]
        if done:
            self._inflight = [f for f in self._inflight if not f.done()]
            for f in done:
                f.result()  # re-raises a failed push here rather than never

    def _meta(self, key: Any) -> Tuple[int, Tuple[int, ...], np.dtype]:
        kid = _key_id(key)
        try:
            shape, dtype = self._shapes[kid]
        except KeyError:
            raise GeoMXError(f"key {key!r} was not initialised with kv.init") from None
        return kid, shape, dtype

    def _command(self, meta: dict, datas: Optional[List[Optional[np.ndarray]]] = None) -> List[Any]:
        return self._node.broadcast(MsgType.COMMAND, meta=meta, datas=datas).result()

    def _per_server_replies(self, meta: dict) -> List[Tuple[dict, np.ndarray]]:
        """A command's (meta, data) reply from every global server, in rank order."""
        replies = self._command(meta)
        if len(replies) == 1 and "parts" in (replies[0].meta or {}):
            return commands.split_merged(replies[0].meta, replies[0].data)  # relayed by a local server
        return [(r.meta or {}, r.data if r.data is not None else np.zeros(0, np.uint8)) for r in replies]

    def _wait_inflight(self) -> None:
        inflight, self._inflight = self._inflight, []
        for f in inflight:
            f.result()

    # -- key-value API --------------------------------------------------------------------------
    def init(self, key: Any, value: Any) -> None:
        self._check()
        futures = self._init(key, value)
        for fut, _ in futures:
            fut.result()

    def _init(self, key: Any, value: Any) -> List[Tuple[cf.Future, int]]:
        futures = []
        for k, arrays in _pairs(key, value):
            if not arrays:
                raise GeoMXError(f"kv.init({k!r}) needs a value")
            kid = _key_id(k)
            arr = arrays[0]
            self._shapes[kid] = (tuple(arr.shape), np.dtype(arr.dtype))
            # Only the master worker's values count: every party starts from the global servers' copy.
            data = arr.asnumpy().reshape(-1) if self.is_master_worker else None
            futures.append((self._node.request(MsgType.INIT, kid, int(np.prod(arr.shape)), arr.dtype,
                                               data=data), kid))
        return futures

    def broadcast(self, key: Any, value: Any, out: Any, priority: int = 0) -> None:
        self._check()
        futures = self._init(key, value)
        outs = [o for _, o in _pairs(key, out)]
        for (fut, kid), targets in zip(futures, outs):
            shape, _ = self._shapes[kid]
            result = fut.result().reshape(shape)
            for o in targets:
                # copyto, not o[:] = numpy: parameters may be held in an MKLDNN layout.
                mx.nd.array(result, dtype=o.dtype, ctx=o.context).copyto(o)

    def push(self, key: Any, value: Any, priority: int = 0) -> None:
        self._check()
        for k, arrays in _pairs(key, value):
            kid, shape, dtype = self._meta(k)
            data = _flat(arrays)
            if data.dtype != dtype:
                raise GeoMXError(f"push of key {k!r}: dtype {data.dtype}, initialised as {dtype}")
            self._inflight.append(self._node.request(MsgType.PUSH, kid, data.size, dtype, data=data,
                                                     priority=priority))

    def pull(self, key: Any, out: Any = None, priority: int = 0, ignore_sparse: bool = True) -> None:
        self._check()
        if out is None:
            raise GeoMXError("kv.pull needs out=")
        for k, targets in _pairs(key, out):
            kid, shape, dtype = self._meta(k)
            fut = self._node.request(MsgType.PULL, kid, int(np.prod(shape)), dtype, priority=priority)
            for o in targets:
                delivery.deliver(fut, o, priority)

    def pushpull(self, key: Any, value: Any, out: Any = None, priority: int = 0) -> None:
        self._check()
        outs = _pairs(key, out) if out is not None else _pairs(key, value)
        for (k, arrays), (_, targets) in zip(_pairs(key, value), outs):
            kid, shape, dtype = self._meta(k)
            data = _flat(arrays)
            fut = self._node.request(MsgType.PUSHPULL, kid, data.size, dtype, data=data, priority=priority)
            self._last_pushpull[kid] = fut
            for o in targets:
                delivery.deliver(fut, o, priority)

    def barrier(self) -> None:
        self._check()
        self._wait_inflight()
        self._node.barrier()

    def _barrier(self) -> None:  # name used by some MXNet code paths
        self.barrier()

    # -- optimizer and compression --------------------------------------------------------------
    def set_optimizer(self, optimizer: Any) -> None:
        """Send ``optimizer`` (as its registered name and hyper-parameters) to the global servers."""
        self._check()
        spec = optimizer_to_spec(optimizer)
        self._command({"cmd": commands.SET_OPTIMIZER, "spec": spec, "master": self.is_master_worker})
        self._updater = _ShadowUpdater(optimizer)

    def set_gradient_compression(self, compression_params: Dict[str, Any]) -> None:
        """Choose how gradients cross the WAN: ``{"type": "bsc", "threshold": 0.01}`` (bidirectional
        sparse), ``"fp16"``, ``"mpq"`` or ``"none"``. Validated here, on every worker; it takes effect
        when the master worker calls it (before ``kv.init``), as in GeoMX."""
        from . import compression

        self._check()
        if not isinstance(compression_params, dict):
            raise GeoMXError("set_gradient_compression expects a dict such as {'type': 'bsc', 'threshold': 0.01}")
        params = {str(k): v for k, v in compression_params.items()}
        if self._cfg.size_lower_bound is not None:
            # Set here: this process decides. Unset: the global servers' own variable does (GeoMX
            # sets it on the servers only), else the default 200000.
            params.setdefault("size_lower_bound", self._cfg.size_lower_bound)
        try:
            codec = compression.create(params)
        except ValueError as exc:
            raise GeoMXError(f"set_gradient_compression: {exc}") from None
        if self.is_master_worker:
            described = codec.params()
            if "size_lower_bound" not in params:
                del described["size_lower_bound"]  # the global servers' value applies
            self._command({"cmd": commands.SET_COMPRESSION, "params": described})

    def report_loss(self, loss: float) -> None:
        """Tell the party's local server this worker's current training loss (a number > 0). With DGT's
        ``ADAPTIVE_K_FLAG=1`` the local server lowers K, the share of blocks sent reliably, as the
        party's mean loss falls: K_t = max(K0 * loss_t / loss_0, DMLC_K_MIN). Does not wait for the
        answer; an error (e.g. a non-finite loss) surfaces at the next kvstore call. A no-op on the
        master worker, which does not train."""
        self._check()
        loss = float(loss)
        if not (math.isfinite(loss) and loss > 0):
            raise GeoMXError(f"report_loss needs a finite loss > 0, got {loss}")
        if self.is_master_worker:
            return
        self._inflight.append(self._node.broadcast(MsgType.COMMAND, meta={"cmd": commands.REPORT_LOSS, "loss": loss}))

    def save_optimizer_states(self, fname: str, dump_optimizer: bool = False) -> None:
        """Save the global servers' optimizer states to ``fname`` (an .npz file without pickles)."""
        self._check()
        self._wait_inflight()
        parts = self._per_server_replies({"cmd": commands.GET_STATES})
        header = json.dumps({"format": "geomx-optimizer-states/1", "parts": [m for m, _ in parts]}).encode()
        with open(fname, "wb") as f:
            np.savez(f, header=np.frombuffer(header, dtype=np.uint8),
                     **{f"server{i}": d for i, (_, d) in enumerate(parts)})

    def save_checkpoint(self) -> List[Dict[str, Any]]:
        """Ask every global server to checkpoint now (they need GEOMX_CHECKPOINT_DIR); returns, per
        global server, where it wrote its checkpoint (``path``, on the server's machine), its size
        (``bytes``), how long the save took (``seconds``) and the rounds its keys were at
        (``min_round``, ``max_round``). This worker's outstanding pushes are sent first; rounds still
        open on the servers are not in the checkpoint (their pushes are resent after a restart)."""
        self._check()
        self._wait_inflight()
        return [meta for meta, _ in self._per_server_replies({"cmd": commands.SAVE_CHECKPOINT})]

    def load_optimizer_states(self, fname: str) -> None:
        """Load states saved by :meth:`save_optimizer_states` into the global servers."""
        self._check()
        self._wait_inflight()
        try:
            with np.load(fname, allow_pickle=False) as z:
                header = json.loads(bytes(z["header"]).decode())
                replies = [commands.Reply(m, z[f"server{i}"]) for i, m in enumerate(header["parts"])]
        except (KeyError, ValueError, OSError) as exc:
            raise GeoMXError(f"{fname} is not a geomx optimizer-state file: {exc}") from None
        meta, data = commands.merge_replies(replies)
        meta["cmd"] = commands.SET_STATES
        self._node.broadcast(MsgType.COMMAND, meta=meta, datas=[data] * self._node.num_servers).result()
        spec = header["parts"][0].get("optimizer") if header["parts"] else None
        if spec and self._updater is None:
            self._updater = _ShadowUpdater(optimizer_from_spec(spec))

    # -- shutdown -------------------------------------------------------------------------------
    def close(self) -> None:
        """Finish outstanding requests and leave the topology (also done at interpreter exit)."""
        self._close(failure=None)

    def _close(self, failure: Optional[str]) -> None:
        """Leave the topology; with ``failure`` (the script is dying of it) at once, telling the others
        why, and failing the requests still unanswered instead of waiting for them."""
        if self._closed:
            return
        self._closed = True
        try:
            if failure is None:
                self._wait_inflight()
                mx.nd.waitall()
        finally:
            self._node.close(failure=failure)

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


_live_stores: "weakref.WeakSet[GeoKVStore]" = weakref.WeakSet()


def _failure_summary(kind: type, value: BaseException) -> str:
    """One line for the other nodes: an MXNetError raised by a delivery op carries the whole Python
    traceback of the geomx error behind it; name that error instead."""
    text = f"{kind.__name__}: {value}"
    if isinstance(value, mx.base.MXNetError):
        lines = [line.strip() for line in str(value).splitlines() if line.strip()]
        causes = [line for line in lines if line.startswith("geomx.errors.")]
        if causes:
            text = causes[-1][len("geomx.errors."):]
        elif lines:
            # The failed check itself, without the traceback lines.
            text = lines[-1] if lines[-1].startswith("MXNetError") else f"MXNetError: {lines[-1]}"
    return text[:500]


def _uncaught_failure() -> Optional[str]:
    """The exception the script is dying of, if it is: Python stores an uncaught exception in
    ``sys.last_value`` (whatever ``sys.excepthook`` the application set, which then prints it)
    before it runs the ``atexit`` handlers. Reading it there, geomx leaves ``sys.excepthook`` to
    the application. (An interactive session sets it for every error shown; a worker script has none.)"""
    value = getattr(sys, "last_value", None)
    if value is None:
        return None
    return _failure_summary(type(value), value)


@atexit.register
def _close_all() -> None:
    # The training script has ended; if by an exception, tell the topology why, at once.
    failure = _uncaught_failure() if _live_stores else None
    for store in list(_live_stores):
        try:
            store._close(failure)
        except Exception as exc:  # noqa: BLE001 - interpreter is exiting
            log.warning("closing kvstore at exit: %s", exc)


def _make(kvtype: str) -> type:
    return type(f"GeoKVStore_{kvtype}", (GeoKVStore,), {"_default_type": kvtype})


def register() -> None:
    """Make ``mx.kv.create`` return geomx's store for the distributed types."""
    for kvtype in ("dist_sync", "dist_async", "dist_sync_device", "dist_async_device", "dist"):
        KVStoreBase.kv_registry[kvtype] = _make(kvtype)


def initialize_trainer(trainer: Any) -> None:
    """On the master worker: send ``trainer``'s optimizer to the global servers (when it updates on
    the store) and initialise every parameter there, without taking a training step.

    Party workers need not call it: their trainer's first ``step`` fetches the master's values.
    """
    if not trainer._kv_initialized:
        trainer._init_kvstore()
    if trainer._params_to_init:
        trainer._init_params()
