"""The framework-neutral worker client: what every front end (MXNet's ``GeoKVStore``, PyTorch's
``DistributedOptimizer``) stands on. It speaks numpy only and imports no framework.

A :class:`Store` is a training script's handle on the hierarchical parameter server: keys are integers
(:func:`key_id` maps names), values flat numpy arrays; ``push`` / ``pull`` / ``pushpull`` / ``init``
send at once and return a ``concurrent.futures.Future``, so a step of an N-parameter model costs about
one round trip, not N. Commands (optimizer, compression, checkpoints, losses) go to every global
server. At interpreter exit every open store is closed; a script dying of an exception tells the whole
topology why at once instead of leaving the others waiting for its pushes.
"""
from __future__ import annotations

import atexit
import concurrent.futures as cf
import hashlib
import json
import logging
import math
import numbers
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from . import commands, config, logutil
from .errors import ConfigError, GeoMXError
from .wire import MsgType
from .worker import WorkerNode

log = logging.getLogger("geomx.store")


def key_id(key: Any) -> int:
    """The wire id of a key: an integer in [0, 2**62) as it is, a string hashed to a stable id every
    process computes alike (bit 62 set, so names never collide with small integer keys)."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        if key < 0 or key >= 1 << 62:
            raise GeoMXError(f"integer keys must be in [0, 2**62), got {key}")
        return int(key)
    if isinstance(key, str):
        return (1 << 62) | int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") \
            & ((1 << 62) - 1)
    raise GeoMXError(f"keys must be int or str, got {type(key).__name__}")


class Store:
    """A worker's handle on the hierarchical parameter server (numpy in, numpy out).

    ``sync`` chooses the global tier's mode (True: FSA, ``dist_sync``; False: MixedSync,
    ``dist_async``); the master worker tells the global servers. ``rank`` and ``num_workers`` are those
    of the worker's own party (as in GeoMX); ``num_all_workers`` counts training workers worldwide.
    """

    def __init__(self, sync: bool = True, cfg: Optional[config.NodeConfig] = None, what: str = "a geomx store"):
        cfg = cfg or config.load()
        if cfg.role != config.WORKER:
            raise ConfigError(f"{what} is for workers; this process has role {cfg.role} "
                              "(run non-worker roles with `python -m geomx.node`)")
        label = "master_worker" if cfg.is_master_worker else "worker"
        logutil.setup_default(cfg.verbose, label)
        self.cfg = cfg
        self.sync = sync
        self.node = WorkerNode(cfg)
        logutil.set_label(label + str(self.node.rank))
        self._sizes: Dict[int, Tuple[int, np.dtype]] = {}
        self._inflight: List[cf.Future] = []
        self._last_pushpull: Dict[int, cf.Future] = {}
        self.closed = False
        if cfg.is_master_worker:
            try:
                self.command({"cmd": commands.SYNC_MODE, "sync": sync})
            except GeoMXError as exc:
                # Refused (e.g. HFA with dist_async): tell the topology now rather than let it wait.
                self.node.close(failure=str(exc))
                raise
        _live_stores.add(self)

    # -- who this worker is ----------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.node.rank

    @property
    def num_workers(self) -> int:
        return self.cfg.num_worker

    @property
    def num_all_workers(self) -> int:
        return self.cfg.num_all_worker

    @property
    def is_master_worker(self) -> bool:
        return self.cfg.is_master_worker

    @property
    def hfa_periods(self) -> Tuple[int, int]:
        """HFA's (K1, K2) from MXNET_KVSTORE_HFA_K1/K2; (1, 1) when HFA is off."""
        return (self.cfg.hfa.k1, self.cfg.hfa.k2) if self.cfg.hfa.enabled else (1, 1)

    def esync_steps(self) -> int:
        """ESync (GEOMX_USE_ESYNC=1): how many local steps this worker takes before its next pushpull.

        The global server assigns each party a count from its measured speed, so that fast and slow
        parties reach the global round at about the same time; 1 until speeds are known. Waits for the
        latest pushpull of key 0, which carries the assignment.
        """
        fut = self._last_pushpull.get(0)
        if fut is not None:
            fut.result()
        steps = self.node.reply_meta.get(0, {}).get("esync_steps", 1)
        return steps if isinstance(steps, int) and steps >= 1 else 1

    # -- helpers --------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise if closed, or the error of a push that failed since the last call (not never)."""
        if self.closed:
            raise GeoMXError("this store is closed")
        done = [f for f in self._inflight if f.done()]
        if done:
            self._inflight = [f for f in self._inflight if not f.done()]
            for f in done:
                f.result()

    def declared(self, key: int) -> Tuple[int, np.dtype]:
        """(size, dtype) a key was initialised with."""
        try:
            return self._sizes[key]
        except KeyError:
            raise GeoMXError(f"key {key} was not initialised (init)") from None

    def command(self, meta: dict, datas: Optional[List[Optional[np.ndarray]]] = None) -> List[Any]:
        """Send a command to every global server (through the party's local servers); their replies."""
        return self.node.broadcast(MsgType.COMMAND, meta=meta, datas=datas).result()

    def _per_server_replies(self, meta: dict) -> List[Tuple[dict, np.ndarray]]:
        """A command's (meta, data) reply from every global server, in rank order."""
        replies = self.command(meta)
        if len(replies) == 1 and "parts" in (replies[0].meta or {}):
            return commands.split_merged(replies[0].meta, replies[0].data)  # relayed by a local server
        return [(r.meta or {}, r.data if r.data is not None else np.zeros(0, np.uint8)) for r in replies]

    def wait_inflight(self) -> None:
        inflight, self._inflight = self._inflight, []
        for f in inflight:
            f.result()

    # -- key-value API (every call returns at once) ----------------------------------------------
    def init(self, key: int, size: int, dtype: Any, value: Optional[np.ndarray] = None) -> cf.Future:
        """Declare ``key``; the future gives the global servers' copy. Only the master worker's
        ``value`` counts: every party starts from the global servers' copy."""
        self.check()
        dtype = np.dtype(dtype)
        self._sizes[key] = (int(size), dtype)
        data = None
        if self.is_master_worker:
            if value is None:
                raise GeoMXError(f"init of key {key} on the master worker needs a value")
            data = np.ascontiguousarray(value, dtype=dtype).reshape(-1)
        return self.node.request(MsgType.INIT, key, int(size), dtype, data=data)

    def _data(self, key: int, data: np.ndarray, what: str) -> np.ndarray:
        size, dtype = self.declared(key)
        if data.dtype != dtype:
            raise GeoMXError(f"{what} of key {key}: dtype {data.dtype}, initialised as {dtype}")
        if data.size != size:
            raise GeoMXError(f"{what} of key {key}: {data.size} elements, initialised with {size}")
        return np.ascontiguousarray(data).reshape(-1)

    def push(self, key: int, data: np.ndarray, priority: int = 0) -> cf.Future:
        self.check()
        data = self._data(key, data, "push")
        fut = self.node.request(MsgType.PUSH, key, data.size, data.dtype, data=data, priority=priority)
        self._inflight.append(fut)
        return fut

    def pull(self, key: int, priority: int = 0) -> cf.Future:
        self.check()
        size, dtype = self.declared(key)
        return self.node.request(MsgType.PULL, key, size, dtype, priority=priority)

    def pushpull(self, key: int, data: np.ndarray, priority: int = 0) -> cf.Future:
        self.check()
        data = self._data(key, data, "pushpull")
        fut = self.node.request(MsgType.PUSHPULL, key, data.size, data.dtype, data=data, priority=priority)
        self._last_pushpull[key] = fut
        return fut

    def barrier(self) -> None:
        self.check()
        self.wait_inflight()
        self.node.barrier()

    # -- optimizer, compression, checkpoints --------------------------------------------------------
    def set_optimizer(self, spec: dict) -> None:
        """Send an optimizer spec (geomx/optimizer_spec.py, geomx/servers/optimizers.py) to the global
        servers, which then update the weights with it."""
        self.check()
        self.command({"cmd": commands.SET_OPTIMIZER, "spec": spec, "master": self.is_master_worker})

    def set_compression(self, compression_params: Dict[str, Any]) -> None:
        """Choose how gradients cross the WAN: ``{"type": "bsc", "threshold": 0.01}`` (bidirectional
        sparse), ``"fp16"``, ``"mpq"`` or ``"none"``. Validated here, on every worker; it takes effect
        when the master worker calls it (before the keys are initialised), as in GeoMX."""
        from . import compression

        self.check()
        if not isinstance(compression_params, dict):
            raise GeoMXError("compression expects a dict such as {'type': 'bsc', 'threshold': 0.01}")
        params = {str(k): v for k, v in compression_params.items()}
        if self.cfg.size_lower_bound is not None:
            # Set here: this process decides. Unset: the global servers' own variable does (GeoMX
            # sets it on the servers only), else the default 200000.
            params.setdefault("size_lower_bound", self.cfg.size_lower_bound)
        try:
            codec = compression.create(params)
        except ValueError as exc:
            raise GeoMXError(f"gradient compression: {exc}") from None
        if self.is_master_worker:
            described = codec.params()
            # A size bound the user left unset stays unset: the global servers' variable applies.
            if "size_lower_bound" not in params:
                described.pop("size_lower_bound", None)
            self.command({"cmd": commands.SET_COMPRESSION, "params": described})

    def report_loss(self, loss: float) -> None:
        """Tell the party's local server this worker's current training loss (a number > 0). With DGT's
        ``ADAPTIVE_K_FLAG=1`` the local server lowers K, the share of blocks sent reliably, as the
        party's mean loss falls: K_t = max(K0 * loss_t / loss_0, DMLC_K_MIN). Does not wait for the
        answer; an error (e.g. a non-finite loss) surfaces at the next call. A no-op on the master
        worker, which does not train."""
        self.check()
        loss = float(loss)
        if not (math.isfinite(loss) and loss > 0):
            raise GeoMXError(f"report_loss needs a finite loss > 0, got {loss}")
        # One dict entry, written from the training thread: the metrics listener reads it (GIL-atomic).
        self.node.loop.metrics.set("geomx_training_loss", loss)
        if self.is_master_worker:
            return
        self._inflight.append(self.node.broadcast(MsgType.COMMAND, meta={"cmd": commands.REPORT_LOSS, "loss": loss}))

    def report_accuracy(self, accuracy: float) -> None:
        """This worker's latest accuracy (a number in [0, 1]), shown by its metrics
        (``geomx_training_accuracy``) and the launcher's status page. Stays in this process."""
        self.check()
        accuracy = float(accuracy)
        if not (math.isfinite(accuracy) and 0.0 <= accuracy <= 1.0):
            raise GeoMXError(f"report_accuracy needs a number in [0, 1], got {accuracy}")
        self.node.loop.metrics.set("geomx_training_accuracy", accuracy)

    def report_progress(self, step: int, total: Optional[int] = None) -> None:
        """Where this worker is: ``step`` steps done of ``total`` planned (None: not said). Shown by its
        metrics (``geomx_training_steps``, ``geomx_training_steps_planned``), from which the launcher's
        progress line estimates the time left. Stays in this process; cheap enough for every step."""
        self.check()
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise GeoMXError(f"report_progress needs a step that is an integer >= 0, got {step!r}")
        if total is not None and (isinstance(total, bool) or not isinstance(total, numbers.Integral) or total <= 0):
            raise GeoMXError(f"report_progress needs a total that is an integer > 0 (or None), got {total!r}")
        m = self.node.loop.metrics
        m.set("geomx_training_steps", int(step))
        if total is not None:
            m.set("geomx_training_steps_planned", int(total))

    def save_optimizer_states(self, fname: str) -> None:
        """Save the global servers' optimizer states to ``fname`` (an .npz file without pickles)."""
        self.check()
        self.wait_inflight()
        parts = self._per_server_replies({"cmd": commands.GET_STATES})
        header = json.dumps({"format": "geomx-optimizer-states/1", "parts": [m for m, _ in parts]}).encode()
        with open(fname, "wb") as f:
            np.savez(f, header=np.frombuffer(header, dtype=np.uint8),
                     **{f"server{i}": d for i, (_, d) in enumerate(parts)})

    def load_optimizer_states(self, fname: str) -> Optional[dict]:
        """Load states saved by :meth:`save_optimizer_states` into the global servers; returns the
        optimizer spec they were saved with (None if the file has none)."""
        self.check()
        self.wait_inflight()
        try:
            with np.load(fname, allow_pickle=False) as z:
                header = json.loads(bytes(z["header"]).decode())
                replies = [commands.Reply(m, z[f"server{i}"]) for i, m in enumerate(header["parts"])]
        except (KeyError, ValueError, OSError) as exc:
            raise GeoMXError(f"{fname} is not a geomx optimizer-state file: {exc}") from None
        meta, data = commands.merge_replies(replies)
        meta["cmd"] = commands.SET_STATES
        self.node.broadcast(MsgType.COMMAND, meta=meta, datas=[data] * self.node.num_servers).result()
        return header["parts"][0].get("optimizer") if header["parts"] else None

    def save_checkpoint(self) -> List[Dict[str, Any]]:
        """Ask every global server to checkpoint now (they need GEOMX_CHECKPOINT_DIR); returns, per
        global server, where it wrote its checkpoint (``path``, on the server's machine), its size
        (``bytes``), how long the save took (``seconds``) and the rounds its keys were at
        (``min_round``, ``max_round``). This worker's outstanding pushes are sent first; rounds still
        open on the servers are not in the checkpoint (their pushes are resent after a restart)."""
        self.check()
        self.wait_inflight()
        return [meta for meta, _ in self._per_server_replies({"cmd": commands.SAVE_CHECKPOINT})]

    # -- shutdown -------------------------------------------------------------------------------
    def close(self) -> None:
        """Finish outstanding requests and leave the topology (also done at interpreter exit)."""
        self.close_with(failure=None)

    def close_with(self, failure: Optional[str], before_leaving: Optional[Callable[[], None]] = None) -> None:
        """Leave the topology; with ``failure`` (the script is dying of it) at once, telling the others
        why, and failing the requests still unanswered instead of waiting for them. ``before_leaving``
        (a front end's own wait, e.g. MXNet's engine) runs after the outstanding pushes, without a
        failure only."""
        if self.closed:
            return
        self.closed = True
        _live_stores.discard(self)
        _closers.pop(self, None)
        try:
            if failure is None:
                self.wait_inflight()
                if before_leaving is not None:
                    before_leaving()
        finally:
            self.node.close(failure=failure)


# Open stores, held here until closed: a script that drops its last reference to one is still a member of the
# topology, which it leaves at exit (a store collected unclosed would vanish without a goodbye).
_live_stores: "set[Store]" = set()
# Front ends' ways to say in one line why a script died (MXNet wraps geomx's errors in its own).
failure_summaries: List[Callable[[BaseException], Optional[str]]] = []
# Front ends' closers, run at exit instead of Store.close_with for the stores they own.
_closers: "Dict[Store, Callable[[Optional[str]], None]]" = {}


def on_exit_close(store: Store, closer: Callable[[Optional[str]], None]) -> None:
    """At interpreter exit close ``store`` with ``closer(failure)`` (a front end's own close)."""
    _closers[store] = closer


def failure_summary(kind: type, value: BaseException) -> str:
    """One line for the other nodes saying why this script died."""
    for summarize in failure_summaries:
        text = summarize(value)
        if text:
            return text[:500]
    return f"{kind.__name__}: {value}"[:500]


def _uncaught_failure() -> Optional[str]:
    """The exception the script is dying of, if it is: Python stores an uncaught exception in
    ``sys.last_value`` (whatever ``sys.excepthook`` the application set, which then prints it)
    before it runs the ``atexit`` handlers. Reading it there, geomx leaves ``sys.excepthook`` to
    the application. (An interactive session sets it for every error shown; a worker script has none.)"""
    value = getattr(sys, "last_value", None)
    if value is None:
        return None
    return failure_summary(type(value), value)


@atexit.register
def _close_all() -> None:
    # The training script has ended; if by an exception, tell the topology why, at once.
    failure = _uncaught_failure() if _live_stores else None
    for store in list(_live_stores):
        try:
            _closers.get(store, store.close_with)(failure)
        except Exception as exc:  # noqa: BLE001 - interpreter is exiting
            log.warning("closing the store at exit: %s", exc)
