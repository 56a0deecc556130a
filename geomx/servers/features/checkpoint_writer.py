"""Writing a global server's checkpoints: one at a time, off the event loop, in snapshot order.

The server takes the snapshot (:meth:`GlobalServer.snapshot`, on its loop: values are references,
optimizer states one copy); a :class:`CheckpointWriter` writes it on a thread of its own, so the
loop keeps serving and heartbeating meanwhile, and reports back on the loop once the file is
durable. It also decides *when*: every ``GEOMX_CHECKPOINT_EVERY`` rounds (skipped, with a warning,
while the previous file is still being written), and on SAVE_CHECKPOINT requests, which are
coalesced while a write is in progress (one snapshot answers every request that came meanwhile, up
to :data:`MAX_WAITING_REQUESTS`). The file format is :mod:`geomx.checkpoint`'s.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from ... import checkpoint
from ...errors import GeoMXError
from ...transport import EventLoop

log = logging.getLogger("geomx.server")

#: SAVE_CHECKPOINT requests that may wait for the checkpoint being written; later ones get an error reply.
MAX_WAITING_REQUESTS = 64

Done = Callable[[object], None]  # called on the loop with the info dict, or the GeoMXError


class _SaveJob:
    """One checkpoint on its way to disk."""

    def __init__(self, ckpt: checkpoint.Checkpoint, path: str, why: str, done: Optional[Done], wait: bool):
        self.ckpt, self.path, self.why, self.done, self.wait = ckpt, path, why, done, wait
        self.start = time.perf_counter()
        self.size = 0
        self.seconds = 0.0
        self.error: Optional[GeoMXError] = None
        self.seq = 0
        self.lock = threading.Lock()
        self.finished = threading.Event()


class CheckpointWriter:
    """Saves what ``snapshot()`` returns into ``directory``; ``on_durable(ckpt)`` runs on the loop
    for the newest checkpoint known to be on disk (the server then lets its clients forget the
    pushes of the rounds it holds)."""

    def __init__(self, loop: EventLoop, name: str, directory: str, every: int, heartbeat_timeout: float,
                 rank: Callable[[], int], snapshot: Callable[[], checkpoint.Checkpoint],
                 on_durable: Callable[[checkpoint.Checkpoint], None]):
        self.loop, self.name, self.directory, self.every = loop, name, directory, every
        self.heartbeat_timeout = heartbeat_timeout
        self._rank, self._snapshot, self._on_durable = rank, snapshot, on_durable
        self.next_round = every  # the round at which the next periodic checkpoint is due
        self._writer: Optional[threading.Thread] = None  # the thread writing the latest checkpoint
        # SAVE_CHECKPOINT requests that came while a checkpoint was being written: answered together by
        # the one checkpoint taken when it is done (one snapshot at a time, however many requests).
        self._requested: Optional[List[Done]] = None
        self.busy = False  # a requested checkpoint is being written
        self._save_seq = itertools.count(1)  # snapshots in the order taken ...
        self._saved_seq = 0  # ... and the newest one known to be on disk

    def schedule_after(self, done: int) -> None:
        """Every key has completed ``done`` rounds (saved, skipped, or restored from a checkpoint): the
        next periodic checkpoint is at the next multiple of ``every`` (GEOMX_CHECKPOINT_EVERY, >= 1)."""
        self.next_round = (done // self.every + 1) * self.every

    def periodic(self, done: int) -> None:
        """Every key has completed ``done`` rounds: save if a periodic checkpoint is due."""
        if done < self.next_round:
            return
        if self._writer is not None and self._writer.is_alive():
            # The previous checkpoint is still being written (a slow disk): skip this one rather
            # than queue up copies of the model; the parties keep their pushes until the next.
            log.warning("%s: checkpoint at round %d skipped: the previous one is still being written",
                        self.name, done)
        else:
            self.save(f"round {done}")
        self.schedule_after(done)

    def save(self, why: str, done: Optional[Done] = None, wait: bool = False) -> Optional[Dict[str, Any]]:
        """Snapshot now and write the file on a background thread. Writes happen one after the other,
        in snapshot order. ``done(info or GeoMXError)`` runs on the loop once the file is durable;
        with ``wait`` this returns ``info`` (or raises) instead."""
        start = time.perf_counter()
        job = _SaveJob(self._snapshot(), checkpoint.file_name(self.directory, self._rank()), why, done, wait)
        job.start = start
        job.seq = next(self._save_seq)
        previous = self._writer

        def write() -> None:
            if previous is not None:
                previous.join()
            try:
                job.size = checkpoint.save(job.ckpt, job.path)
            except OSError as exc:
                job.error = GeoMXError(f"global server {self._rank()}: cannot write checkpoint {job.path}: {exc}")
            job.seconds = time.perf_counter() - job.start
            with job.lock:
                job.finished.set()
                report = not job.wait  # else the loop, waiting for it, reports it
            if report:
                try:
                    self.loop.call_soon_threadsafe(lambda: self._saved(job))
                except Exception:  # noqa: BLE001 - the server has shut down meanwhile: nobody to tell
                    pass

        # Not a daemon: an exiting server finishes the file it is writing.
        self._writer = threading.Thread(target=write, name="geomx-checkpoint")
        self._writer.start()
        if not wait:
            return None
        # The loop waits here (the STOP that asked for it is answered after it), but not beyond half the
        # heartbeat timeout: its scheduler would declare it dead. A slow disk then loses only durability.
        limit = self.heartbeat_timeout / 2
        job.finished.wait(limit)
        with job.lock:
            if not job.finished.is_set():
                job.wait = False  # the writer reports it on the loop when it is done
                log.error("%s: checkpoint (%s) not written after %.1fs (half of PS_HEARTBEAT_TIMEOUT); going on "
                          "without waiting for it", self.name, why, limit)
                return None
        return self._saved(job)

    def request(self, done: Done) -> None:
        """SAVE_CHECKPOINT: a checkpoint now, or, while one is being written, the next one (taken once
        it is done, for every request that came meanwhile)."""
        if not self.busy:
            self._start_requested([done])
            return
        if self._requested is None:
            self._requested = []
        if len(self._requested) >= MAX_WAITING_REQUESTS:
            done(GeoMXError(f"global server {self._rank()}: {len(self._requested)} checkpoint requests wait for "
                            "the one being written already"))
            return
        self._requested.append(done)

    def _start_requested(self, dones: List[Done]) -> None:
        def answer(result: object) -> None:
            self.busy = False
            for done in dones:
                done(result)
            if self._requested:
                waiting, self._requested = self._requested, None
                self._start_requested(waiting)

        self.save("requested", done=answer)
        self.busy = True

    def _saved(self, job: _SaveJob) -> Optional[Dict[str, Any]]:
        """On the loop, once ``job``'s file is written (or failed)."""
        if job.error is not None:
            log.error("%s", job.error)
            if job.done is not None:
                job.done(job.error)
            if job.wait:
                raise job.error
            return None
        self.loop.metrics.inc("geomx_checkpoint_saves_total")
        if job.seq > self._saved_seq:  # a waited-for save may finish before an earlier one is reported
            self._saved_seq = job.seq
            self._on_durable(job.ckpt)
        rounds = [rec.completed for rec in job.ckpt.keys] or [0]
        log.info("%s: checkpoint (%s) of %d key(s) at rounds %d..%d: %s, %d bytes in %.3fs", self.name, job.why,
                 len(job.ckpt.keys), min(rounds), max(rounds), job.path, job.size, job.seconds)
        info = {"path": job.path, "bytes": job.size, "seconds": job.seconds, "min_round": min(rounds),
                "max_round": max(rounds), "rank": self._rank()}
        if job.done is not None:
            job.done(info)
        return info
