"""A worker's connection to its party: one background I/O thread owns the sockets (scheduler link with
heartbeats, links to the party's servers); the training thread hands it requests and gets
``concurrent.futures.Future`` objects back, so many requests can be in flight at once."""
from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
from typing import Any, Dict, List, Optional

import numpy as np
import zmq

from . import metrics
from .config import NodeConfig
from .errors import GeoMXError, PeerDeadError
from .kvclient import KVClient, client_options
from .membership import TierInfo, TierMember
from .transport import EventLoop, Link, bind_router
from .tsengine.keys import LinkKeys
from .tsengine.peer import TSPeer
from .wire import Message, MsgType

log = logging.getLogger("geomx.worker")


class WorkerNode:
    def __init__(self, cfg: NodeConfig):
        self.cfg = cfg
        self.ctx = zmq.Context()
        self.loop = EventLoop(self.ctx, cfg.max_message_bytes, name="worker", keys=cfg.curve,
                              local_ipc=cfg.local_ipc)
        self.fatal: Optional[Exception] = None
        self.info: Optional[TierInfo] = None
        self.kv: Optional[KVClient] = None
        self.member: Optional[TierMember] = None
        self._barriers: List[cf.Future] = []
        self.reply_meta: Dict[int, dict] = {}  # latest meta the servers sent with a data reply, by key
        self._closing = False
        # ENABLE_INTRA_TS: pushes go up an aggregation tree of the party's workers and results come
        # back by relay (the master worker, which does not train, never takes part).
        self.intra_ts = cfg.tsengine.intra and not cfg.is_master_worker
        self.ts: Optional[TSPeer] = None
        self.ts_link: Optional[Link] = None
        self.ts_pushed: Dict[int, int] = {}  # key -> rounds this worker contributed
        self.ts_latest: Dict[int, tuple] = {}  # key -> (round, value) of the newest result relayed here
        self.ts_waiters: Dict[tuple, List[Any]] = {}  # (key, round) -> callbacks(value)
        self.ts_since: Dict[tuple, float] = {}  # (key, round) -> when the first of them began to wait
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="geomx-io", daemon=True)
        self._thread.start()
        if not self._ready.wait(cfg.start_timeout + 10):
            raise GeoMXError(f"worker start-up timed out after {cfg.start_timeout:.0f}s")
        if self.fatal is not None:
            raise self.fatal

    # -- I/O thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        cfg = self.cfg
        try:
            scheduler = (cfg.root_uri, cfg.root_port)
            ts_port = 0
            if self.intra_ts:
                self.ts_link, ts_port = bind_router(self.loop, cfg.ts_port, "ts-peers",
                                                    host=cfg.bind_address(*scheduler))
            self.member = TierMember(
                self.loop, "party", scheduler, role="worker", host=cfg.advertised_host(*scheduler), port=ts_port,
                name="master_worker" if cfg.is_master_worker else "worker", master=cfg.is_master_worker,
                ts=self.intra_ts,
                heartbeat_interval=cfg.heartbeat_interval, heartbeat_timeout=cfg.heartbeat_timeout,
                start_timeout=cfg.start_timeout, on_fatal=self._on_fatal)
            self.member.register()
            self.loop.run_until(lambda: self.member.info is not None or self.fatal is not None,
                                timeout=cfg.start_timeout, what="registration with the party scheduler")
            if self.fatal is None:
                self.info = self.member.info
                assert self.info is not None
                identity = self.member.client_identity(f"worker{self.info.rank}")
                self.kv = KVClient(self.loop, self.info.servers, identity=identity,
                                   sender=self.info.rank, bigarray_bound=cfg.bigarray_bound, wan=False,
                                   name=("master_worker" if cfg.is_master_worker else "worker") + str(self.info.rank),
                                   global_servers=self.info.global_servers, **client_options(cfg, self.loop))
                self.kv.on_meta = self._on_meta
                if self.kv.trace is not None and cfg.party:  # every party has a worker0: name the file apart
                    self.kv.trace.name = f"{cfg.party}/{self.kv.name}"
                self._observe(self.kv, cfg.bind_address(*scheduler))
                # A global server of the central party restarted from its checkpoint.
                kv = self.kv
                self.member.on_servers_changed = lambda old, new: kv.update_servers(new.servers)
                if self.intra_ts:
                    assert self.ts_link is not None
                    self.ts = TSPeer(self.loop, self.info.rank, f"worker{self.info.rank}", self, self.member.send,
                                     self._on_ts_fatal, wan=False, keys=LinkKeys.from_meta(self.info.ts_keys))
                    self.member.on_tsengine = self.ts.on_answer
                    self.loop.add(self.ts_link, self.ts.handle, routed=True)
                    self.loop.call_every(min(5.0, cfg.request_timeout / 4), self._expire_ts)
        except Exception as exc:  # noqa: BLE001 - reported to the training thread
            self.fatal = exc
        finally:
            self._ready.set()
        while not self._closing:
            self.loop.run_once(0.2)
        for _ in range(3):  # let the goodbye leave
            self.loop.run_once(0.05)
        if self.kv is not None:
            self.kv.write_trace()
        if self.cfg.metrics_dir:
            metrics.dump(self.loop.metrics, self.cfg.metrics_dir)  # its last figures, for tests and benchmarks
        self.loop.close()

    def _observe(self, kv: KVClient, host: str) -> None:
        """Name this worker in its metrics, count its unanswered requests, serve them (GEOMX_METRICS_PORT)."""
        self.loop.metrics.identify(role="master_worker" if self.cfg.is_master_worker else "worker",
                                   node=kv.name, party=self.cfg.party or "")
        self.loop.metrics.add_collector(lambda: [metrics.sample("geomx_pending_requests", len(kv.pending))])
        metrics.serve(self.cfg.metrics_port, host, self.loop)

    def _on_meta(self, key: int, meta: dict) -> None:
        self.reply_meta[key] = meta

    def _on_fatal(self, exc: Exception) -> None:
        if self.fatal is None:
            self.fatal = exc
            log.error("%s", exc)
        self._fail_outstanding(exc)

    def _on_ts_fatal(self, exc: Exception) -> None:
        """A TSEngine hop this worker owes its party failed: the peers waiting for it would wait
        forever; the scheduler stops the tier at once with the reason (I/O thread)."""
        first = self.fatal is None
        self._on_fatal(exc)
        if first and self.member is not None:
            self.member.bye(str(exc))

    def _fail_outstanding(self, exc: Exception) -> None:
        """Complete every request, relay wait and barrier still open with ``exc``. A pull left open
        would keep its delivery operation pending in MXNet's engine, and MXNet waits for every
        operation at interpreter exit: the process would never end."""
        if self.kv is not None:
            self.kv.fail_all(exc)
        waiters, self.ts_waiters = self.ts_waiters, {}
        self.ts_since.clear()
        for callbacks in waiters.values():
            for callback in callbacks:
                callback(None, exc)
        barriers, self._barriers = self._barriers, []
        for fut in barriers:
            if not fut.done():
                fut.set_exception(exc)

    def _in_loop(self, fn: Any) -> None:
        if self.fatal is not None:
            raise self.fatal
        if self._closing:
            raise GeoMXError("the kvstore is closed")
        self.loop.call_soon_threadsafe(fn)

    # -- API for the training thread ----------------------------------------------------------
    @property
    def rank(self) -> int:
        assert self.info is not None
        return self.info.rank

    @property
    def num_servers(self) -> int:
        assert self.info is not None
        return len(self.info.servers)

    def request(self, mtype: MsgType, key: int, total: int, dtype: Any, *, data: Optional[np.ndarray] = None,
                meta: Optional[dict] = None, priority: int = 0) -> cf.Future:
        fut: cf.Future = cf.Future()

        def done(value: Optional[np.ndarray], error: Optional[Exception]) -> None:
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(value)

        if self.ts is not None and mtype in (MsgType.PUSH, MsgType.PULL, MsgType.PUSHPULL):
            self._in_loop(lambda: self._ts_request(mtype, key, total, dtype, data, done))
        else:
            self._in_loop(lambda: self.kv.request(mtype, key, total, dtype, done, data=data, meta=meta,  # type: ignore[union-attr]
                                                  priority=priority))
        return fut

    # -- ENABLE_INTRA_TS (I/O thread) -----------------------------------------------------------
    def _ts_request(self, mtype: MsgType, key: int, total: int, dtype: Any, data: Optional[np.ndarray],
                    done: Any) -> None:
        """A push contributes this worker's next round of ``key`` to the party's aggregation tree and
        completes when that round's result is relayed here (as a plain push completes when the local
        server's round does); a pull waits for the result of the last round this worker pushed."""
        assert self.ts is not None and self.kv is not None
        if self.kv.failed is not None:
            done(None, self.kv.failed)
            return
        if mtype == MsgType.PULL and key not in self.ts_pushed:
            # Nothing pushed yet (the initial weights): the local server has the value.
            self.kv.request(mtype, key, total, dtype, done)
            return
        if mtype != MsgType.PULL:
            assert data is not None
            rnd = self.ts_pushed.get(key, 0)
            self.ts_pushed[key] = rnd + 1
            self.ts.contribute(key, rnd, data, np.dtype(dtype))
        rnd = self.ts_pushed[key] - 1
        latest = self.ts_latest.get(key)
        want_value = mtype != MsgType.PUSH
        if latest is not None and latest[0] >= rnd:
            done(latest[1] if want_value else None, None)
            return
        self.ts_waiters.setdefault((key, rnd), []).append(
            lambda value, error: done(value if want_value else None, error))
        self.ts_since.setdefault((key, rnd), time.monotonic())

    def _expire_ts(self) -> None:
        """GEOMX_REQUEST_TIMEOUT for results relayed by TSEngine: a relay that does not come (the peer
        that was to pass it on is stuck or left) fails the requests waiting for it, saying so."""
        limit = time.monotonic() - self.cfg.request_timeout
        for where in [w for w, since in self.ts_since.items() if since < limit]:
            del self.ts_since[where]
            error = GeoMXError(f"worker{self.info.rank if self.info else '?'}: the TSEngine result of key {where[0]} "
                               f"round {where[1]} was not relayed to this worker within {self.cfg.request_timeout:g}s "
                               "(GEOMX_REQUEST_TIMEOUT): the party peer or local server that was to pass it on is "
                               "stuck or gone")
            log.error("%s", error)
            for callback in self.ts_waiters.pop(where, []):
                callback(None, error)

    def ts_check(self, kind: MsgType, key: int, rnd: int, data: np.ndarray) -> Optional[str]:
        if rnd >= self.ts_pushed.get(key, 0):
            return f"this worker has not pushed key {key} round {rnd}"
        return None

    def ts_model(self, key: int, rnd: int, data: np.ndarray) -> None:
        self.ts_since.pop((key, rnd), None)
        latest = self.ts_latest.get(key)
        if latest is None or latest[0] < rnd:
            self.ts_latest[key] = (rnd, data)
        for callback in self.ts_waiters.pop((key, rnd), []):
            callback(data, None)

    def broadcast(self, mtype: MsgType, *, meta: Optional[dict] = None,
                  datas: Optional[List[Optional[np.ndarray]]] = None) -> cf.Future:
        fut: cf.Future = cf.Future()

        def done(replies: List[Message], error: Optional[Exception]) -> None:
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(replies)

        self._in_loop(lambda: self.kv.broadcast(mtype, done, meta=meta, datas=datas))  # type: ignore[union-attr]
        return fut

    def barrier(self) -> None:
        fut: cf.Future = cf.Future()

        def enter() -> None:
            if self.fatal is not None:
                fut.set_exception(self.fatal)
                return
            self._barriers.append(fut)
            self.member.barrier("worker", lambda: self._release(fut))  # type: ignore[union-attr]

        self._in_loop(enter)
        fut.result()

    def _release(self, fut: cf.Future) -> None:
        # A barrier already failed by a dead peer stays failed: the scheduler's release may still
        # be read after its dead-peer notice, from the same connection's last messages.
        if fut in self._barriers:
            self._barriers.remove(fut)
            fut.set_result(None)

    def close(self, timeout: float = 30.0, failure: Optional[str] = None) -> None:
        """Tell the servers this worker is done, say goodbye to the scheduler, stop the I/O thread.

        With ``failure`` (the training script died), the scheduler stops the whole tier at once
        with that reason instead of letting the other workers wait for this one's pushes."""
        if self._closing:
            return
        try:
            if self.fatal is None and self.ts is not None and failure is None:
                # Other workers may still be waiting for results this worker relays to them.
                idle: cf.Future = cf.Future()
                self._in_loop(lambda: self.ts.when_idle(lambda: idle.set_result(None)))  # type: ignore[union-attr]
                try:
                    idle.result(timeout)
                except cf.TimeoutError:
                    # Leaving quietly would leave them waiting for ever: the scheduler tells them why.
                    failure = (f"worker {self.info.rank if self.info else '?'} is leaving with TSEngine hops its "
                               f"party peers wait for still not passed on after {timeout:.0f}s: "
                               f"{self.ts.pending()}")  # type: ignore[union-attr]
                    log.error("%s", failure)
            if self.fatal is None and self.kv is not None and failure is None:
                self.broadcast(MsgType.STOP).result(timeout)
        except (cf.TimeoutError, PeerDeadError, GeoMXError) as exc:
            log.warning("stop not acknowledged: %s", exc)
        finally:
            if self.member is not None and self.fatal is None:
                member = self.member
                self.loop.call_soon_threadsafe(lambda: member.bye(failure))
            self._closing = True
            self._thread.join(timeout=5)
            # After a failure (the script died, or a server refused a push) requests may be left
            # that no reply will ever complete; without the I/O thread nothing else would.
            self._fail_outstanding(self.fatal or GeoMXError(
                "the kvstore was closed before this request was answered" + (f" ({failure})" if failure else "")))
            self.ctx.destroy(linger=1000)
