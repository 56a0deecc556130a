"""The process supervisor of the launcher: start a topology's processes, relay their output line by
line with a name prefix, and stop every one of them on the first failure, a timeout or a signal."""

from __future__ import annotations

import atexit
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import IO, Any, Dict, List, Optional, Sequence, Tuple, Union

from .layout import ProcessSpec
from .topology import Topology

log = logging.getLogger("geomx.launch")

#: Exit status when the launcher's timeout is exceeded (as coreutils ``timeout``).
EXIT_TIMEOUT = 124
#: Exit status when a non-worker had to be killed after every worker succeeded.
EXIT_STRAGGLER = 1


def _exit_status(returncode: int) -> int:
    """Popen return code -> shell-style exit status (signal N -> 128 + N)."""
    return returncode if returncode >= 0 else 128 - returncode


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


class _Signalled(BaseException):
    """Raised in the main thread when the launcher receives SIGTERM/SIGINT."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _Child:
    def __init__(self, spec: ProcessSpec, popen: subprocess.Popen, logfile: Optional[IO[bytes]]):
        self.spec = spec
        self.popen = popen
        self.pgid = popen.pid  # start_new_session=True: the child leads its own group
        self.logfile = logfile
        self.returncode: Optional[int] = None  # set when the exit was seen by the monitor
        self.reader: Optional[threading.Thread] = None

    @property
    def name(self) -> str:
        return self.spec.name

    def poll(self) -> Optional[int]:
        return self.popen.poll()


def _signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to a process group; False when the group no longer exists."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


_ACTIVE: "set[_Launcher]" = set()
_ACTIVE_LOCK = threading.Lock()


def _atexit_cleanup() -> None:
    with _ACTIVE_LOCK:
        launchers = list(_ACTIVE)
    for launcher in launchers:
        launcher.kill_now()


atexit.register(_atexit_cleanup)


class _Launcher:
    def __init__(
        self, specs: List[ProcessSpec], stream: IO[str], log_dir: Optional[str], kill_timeout: float
    ):
        self.specs = specs
        self.stream = stream
        self.log_dir = log_dir
        self.kill_timeout = kill_timeout
        self.children: List[_Child] = []
        self.observer: Optional[Any] = None  # told of each exit and of the end (run_processes)
        self.why = ""  # why the run ended badly, for the observer
        self.stream_lock = threading.Lock()
        self.stopping = False
        # While a child is being started, a SIGINT/SIGTERM is deferred so that no started
        # process can escape the bookkeeping.
        self.critical = False
        self.pending_signal: Optional[int] = None

    # ---- output
    def _pump(self, child: _Child) -> None:
        prefix = f"[{child.name}] "
        pipe = child.popen.stdout
        assert pipe is not None
        try:
            for raw in iter(pipe.readline, b""):
                if child.logfile is not None:
                    try:
                        child.logfile.write(raw)
                        child.logfile.flush()
                    except (OSError, ValueError):
                        pass
                text = raw.decode("utf-8", errors="replace")
                if not text.endswith("\n"):
                    text += "\n"
                try:
                    with self.stream_lock:
                        self.stream.write(prefix + text)
                        self.stream.flush()
                except (OSError, ValueError):
                    pass  # keep draining the pipe so the child never blocks on it
        except (OSError, ValueError):
            pass
        finally:
            try:
                pipe.close()
            except OSError:
                pass

    # ---- start
    def start(self, spec: ProcessSpec, again: bool = False) -> None:
        """Start ``spec`` (``again``: in place of its killed predecessor, whose log it continues)."""
        logfile = None
        if self.log_dir is not None:
            path = os.path.join(self.log_dir, spec.name + ".log")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            logfile = open(path, "ab" if again else "wb")
        try:
            popen = subprocess.Popen(
                spec.argv,
                env=spec.env,
                # A remote process (over SSH) runs while its input stays open: see geomx/launch/remote.py.
                stdin=subprocess.PIPE if spec.keep_stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                pass_fds=(spec.listener.fileno(),) if spec.listener is not None else (),
                cwd=spec.cwd,
            )
        except BaseException:
            if logfile is not None:
                logfile.close()
            raise
        finally:
            # The child holds the port now (or never will): the launcher's copy must not keep it
            # open, or clients would queue on a socket nobody serves once that child is gone.
            if spec.listener is not None:
                spec.listener.close()
                spec.listener = None
        child = _Child(spec, popen, logfile)
        self.children.append(child)
        child.reader = threading.Thread(
            target=self._pump, args=(child,), name=f"geomx-launch-{spec.name}", daemon=True
        )
        child.reader.start()
        log.debug("started %s (pid %d): %s", spec.name, popen.pid, shlex.join(spec.argv))

    # ---- stop
    def stop_all(self) -> List[_Child]:
        """SIGTERM every process group, SIGKILL after ``kill_timeout``. Returns the children
        that were still running when the stop began."""
        self.stopping = True
        running = [c for c in self.children if c.poll() is None]
        # Remote processes first: closing their input makes each host stop its process group, and their
        # SSH clients exit once it is gone (a SIGTERM would only end the local client, at once).
        remote = [c for c in self.children if c.popen.stdin is not None]
        for c in remote:
            try:
                c.popen.stdin.close()
            except OSError:
                pass
        end = time.monotonic() + self.kill_timeout + 5  # the hosts' own SIGTERM-to-SIGKILL delay
        while remote and time.monotonic() < end and any(c.poll() is None for c in remote):
            time.sleep(0.02)
        for c in self.children:
            # Also groups whose leader already exited: grandchildren may still be there.
            _signal_group(c.pgid, signal.SIGTERM)
        end = time.monotonic() + self.kill_timeout
        while time.monotonic() < end and any(c.poll() is None for c in self.children):
            time.sleep(0.02)
        for c in self.children:
            leader_alive = c.poll() is None
            if leader_alive:
                log.warning(
                    "%s did not stop within %.3g s of SIGTERM; sending SIGKILL", c.name, self.kill_timeout
                )
            if leader_alive or _signal_group(c.pgid, 0):
                _signal_group(c.pgid, signal.SIGKILL)
        for c in self.children:
            try:
                c.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
                log.error("%s (pid %d) could not be reaped", c.name, c.popen.pid)
        return running

    def kill_now(self) -> None:
        """Last-resort cleanup (atexit): SIGKILL everything, no grace."""
        for c in self.children:
            _signal_group(c.pgid, signal.SIGKILL)
            try:
                c.popen.wait(timeout=1)
            except Exception:
                pass

    def close(self) -> None:
        for c in self.children:
            if c.reader is not None:
                c.reader.join(timeout=2)
            if c.logfile is not None:
                try:
                    c.logfile.close()
                except OSError:
                    pass
        try:
            with self.stream_lock:
                self.stream.flush()
        except (OSError, ValueError):
            pass


def run(
    topology: Topology,
    command: Union[str, Sequence[str]],
    *,
    timeout: Optional[float] = None,
    log_dir: Optional[str] = None,
    stream: Optional[IO[str]] = None,
    grace: float = 30.0,
    kill_timeout: float = 5.0,
    observer: Optional[Any] = None,
) -> int:
    """Run the topology until it finishes; return an exit status.

    * every worker exits 0 and then every non-worker exits 0 within ``grace`` seconds -> 0;
      a non-worker still running after ``grace`` is terminated and the result is non-zero;
    * the first process exiting non-zero (any role) stops the topology; its code is returned
      (128 + N when it was killed by signal N);
    * ``timeout`` seconds exceeded -> 124; SIGINT/KeyboardInterrupt -> 130; SIGTERM -> 143.

    Children run in their own process groups and are always terminated before returning
    (SIGTERM to the group, SIGKILL after ``kill_timeout`` seconds). Their stdout+stderr are
    written line by line to ``stream`` (default ``sys.stdout``) prefixed with ``[name] ``,
    and raw to ``log_dir/<name>.log`` when ``log_dir`` is given.
    """
    ports = topology.reserve_ports()
    try:
        specs = topology.processes(command, ports)
        workers = topology.workers_per_party
        description = (
            f"{topology.parties} parties x {workers if isinstance(workers, int) else list(workers)} workers, "
            f"{topology.global_servers} global server(s), {topology.central_workers} central worker(s) on "
            + (", ".join(f"{dc} {h}" for dc, h in topology.dc_hosts.items()) if topology.dc_hosts else topology.host)
        )
        if callable(observer):  # built from the process list, now that it exists (the status page)
            observer = observer(specs)
        return run_processes(specs, description, timeout=timeout, log_dir=log_dir, stream=stream, grace=grace,
                             kill_timeout=kill_timeout, observer=observer)
    finally:
        ports.close()  # those of schedulers that were never started


def run_processes(
    specs: List[ProcessSpec],
    description: str,
    *,
    timeout: Optional[float] = None,
    log_dir: Optional[str] = None,
    stream: Optional[IO[str]] = None,
    grace: float = 30.0,
    kill_timeout: float = 5.0,
    observer: Optional[Any] = None,
) -> int:
    """Start ``specs`` in order and supervise them as :func:`run` describes (``description`` is logged).

    ``observer`` (the status page, :class:`.status.StatusPage`) is told each process's exit,
    ``process_exited(name, status, reason)``, and the end, ``run_ended(status, why)``."""
    if stream is None:
        stream = sys.stdout
    launcher = _Launcher(specs, stream, log_dir, kill_timeout)
    launcher.observer = observer
    with _ACTIVE_LOCK:
        _ACTIVE.add(launcher)

    def on_signal(signum, frame):
        if launcher.stopping:
            return
        if launcher.critical:
            launcher.pending_signal = signum
            return
        raise _Signalled(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        # Respect a SIGINT that was ignored on purpose (e.g. a background job in a script).
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            previous[signal.SIGINT] = signal.signal(signal.SIGINT, on_signal)
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, on_signal)

    status = 1
    stragglers: List[_Child] = []
    try:
        status, stragglers = _supervise(launcher, description, timeout, grace)
    except (_Signalled, KeyboardInterrupt) as exc:
        signum = exc.signum if isinstance(exc, _Signalled) else signal.SIGINT
        status = 128 + int(signum)
        launcher.why = f"the launcher received {signal.Signals(signum).name}"
        log.error("launcher received %s; stopping the topology", signal.Signals(signum).name)
    finally:
        launcher.stopping = True
        try:
            launcher.stop_all()
            for c in stragglers:
                code = c.popen.returncode
                log.error(
                    "%s had to be terminated after every worker succeeded (exit %s)",
                    c.name,
                    f"code {code}" if code >= 0 else _signal_name(code),
                )
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            launcher.close()
            with _ACTIVE_LOCK:
                _ACTIVE.discard(launcher)
            if observer is not None:
                observer.run_ended(status, launcher.why if status else "every process exited with code 0")
    return status


#: Times one process is started again after it was killed (a global server from its checkpoint, the
#: global scheduler with its nodes' help).
MAX_RESTARTS = 3


def _killed_by(rc: int) -> Optional[int]:
    """The signal that ended a process with exit status ``rc``: a local child's negative status, or a
    remote one's 128 + N (passed back by geomx.launch.remote and SSH); None if it exited."""
    if rc < 0:
        return -rc
    return rc - 128 if 128 < rc < 128 + 65 else None


def _replacement(child: _Child, rc: int, restarts: Dict[str, int]) -> Optional[Tuple[ProcessSpec, float]]:
    """The process to start in place of ``child``, which ended with ``rc``, and when: only a process
    that can be restarted (ProcessSpec.restart) and was killed, not one that failed with an error of
    its own or that the launcher stopped; at most MAX_RESTARTS times."""
    sig = _killed_by(rc)
    if child.spec.restart is None or sig is None or sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        return None
    if restarts.get(child.name, 0) >= MAX_RESTARTS:
        log.error("%s was killed again (%s) after %d restarts; not restarting it", child.name, _signal_name(-sig),
                  MAX_RESTARTS)
        return None
    again = child.spec.restart()
    if again is None:
        return None
    restarts[child.name] = restarts.get(child.name, 0) + 1
    how = "the tier's nodes come back to it" if child.name == "global_scheduler" else "from its checkpoint"
    log.warning("%s was killed (%s); starting it again in %.1f s, %s (restart %d of %d)", child.name,
                _signal_name(-sig), again[1], how, restarts[child.name], MAX_RESTARTS)
    return again


def _may_rejoin(launcher: _Launcher, party: str, rejoins: Dict[str, int]) -> bool:
    """Whether the lost ``party`` is to be started again now: GEOMX_LOST_PARTY=rejoin, none of its
    processes still running, and fewer than MAX_RESTARTS starts so far."""
    mine = [c for c in launcher.children if c.spec.party == party]
    if not mine or mine[0].spec.rejoin is None or any(c.returncode is None for c in mine):
        return False
    if rejoins.get(party, 0) >= MAX_RESTARTS:
        return False
    # Not once the global tier has ended (it is here when this launcher runs the central site).
    central = [c for c in launcher.children if c.name == "global_scheduler"]
    return not central or central[-1].returncode is None


def _supervise(launcher: _Launcher, description: str, timeout: Optional[float], grace: float):
    start = time.monotonic()
    deadline = start + timeout if timeout is not None else None
    log.info("starting %d processes: %s", len(launcher.specs), description)
    for spec in launcher.specs:
        launcher.critical = True
        try:
            launcher.start(spec)
        except OSError as exc:
            launcher.critical = False
            log.error(
                "could not start %s (%s): %s; stopping the topology", spec.name, shlex.join(spec.argv), exc
            )
            launcher.why = f"could not start {spec.name}: {exc}"
            if isinstance(exc, FileNotFoundError):
                return 127, []
            if isinstance(exc, PermissionError):
                return 126, []
            return 1, []
        launcher.critical = False
        if launcher.pending_signal is not None:
            raise _Signalled(launcher.pending_signal)

    grace_deadline: Optional[float] = None
    restarts: Dict[str, int] = {}  # process name -> times started again
    due: List[Tuple[float, ProcessSpec]] = []  # replacements waiting to be started
    lost: Dict[str, str] = {}  # party -> why the run goes on without it (GEOMX_LOST_PARTY=continue)
    rejoins: Dict[str, int] = {}  # party -> times started again (GEOMX_LOST_PARTY=rejoin)
    while True:
        now = time.monotonic()
        for when, spec in [d for d in due if d[0] <= now]:
            due.remove((when, spec))
            launcher.critical = True
            try:
                launcher.start(spec, again=True)
            except OSError as exc:
                log.error("could not start %s again (%s); stopping the topology", spec.name, exc)
                launcher.why = f"could not start {spec.name} again: {exc}"
                return 1, []
            finally:
                launcher.critical = False
        for c in launcher.children:
            if c.returncode is not None:
                continue
            rc = c.poll()
            if rc is None:
                continue
            c.returncode = rc
            if launcher.observer is not None:
                launcher.observer.process_exited(c.name, _exit_status(rc),
                                                 f"killed by {_signal_name(rc)}" if rc < 0 else "")
            again = _replacement(c, rc, restarts)
            if again is not None:
                due.append((now + again[1], again[0]))
                continue
            if rc != 0 and c.spec.party in lost:
                continue  # a process of a party the run already goes on without
            if rc != 0 and c.spec.party_may_be_lost and any(o.spec.party != c.spec.party for o in launcher.children):
                # (A launcher of that party's site alone, --site, fails with it: the run's other sites
                # go on, and the party can be started again to rejoin.)
                status = _exit_status(rc)
                lost[c.spec.party] = f"{c.name} exited with code {status}"
                log.warning("%s exited with code %d; the run goes on without party %s (GEOMX_LOST_PARTY=%s)",
                            c.name, status, c.spec.party, "rejoin" if c.spec.rejoin is not None else "continue")
                # Its party's other processes stop with it (the global tier drops the party).
                for other in launcher.children:
                    if other.spec.party == c.spec.party and other.returncode is None:
                        _signal_group(other.pgid, signal.SIGTERM)
                continue
            if rc != 0:
                status = _exit_status(rc)
                detail = f" (killed by {_signal_name(rc)})" if rc < 0 else ""
                log.error("%s exited with code %d%s; stopping the topology", c.name, status, detail)
                launcher.why = f"{c.name} exited with code {status}{detail}"
                return status, []
            log.info("%s exited with code 0", c.name)

        for party in [p for p in lost if _may_rejoin(launcher, p, rejoins)]:
            # Every process of the lost party has ended: start them all again, a little later each time.
            n = rejoins[party] = rejoins.get(party, 0) + 1
            log.warning("starting party %s again (%d of %d) so that it rejoins the run (GEOMX_LOST_PARTY=rejoin)",
                        party, n, MAX_RESTARTS)
            for spec in launcher.specs:
                if spec.party == party and spec.rejoin is not None:
                    due.append((now + 2.0 * n, spec.rejoin(n)))
            del lost[party]

        if not due and all(c.returncode is not None for c in launcher.children if c.spec.is_worker):
            pending = [c for c in launcher.children if c.returncode is None]
            if not pending:
                if lost:
                    log.warning("the run ended without part%s %s: %s", "y" if len(lost) == 1 else "ies",
                                ", ".join(sorted(lost)), "; ".join(lost[p] for p in sorted(lost)))
                else:
                    log.info("all processes exited with code 0")
                return 0, []
            if grace_deadline is None:
                grace_deadline = now + grace
                log.info(
                    "all workers succeeded; waiting up to %.3g s for %d other process(es) to exit",
                    grace,
                    len(pending),
                )
            elif now >= grace_deadline:
                for c in pending:
                    log.error(
                        "%s still running %.3g s after every worker succeeded; terminating it", c.name, grace
                    )
                launcher.why = f"{', '.join(c.name for c in pending)} still running {grace:.3g} s after every worker " \
                    "succeeded"
                return EXIT_STRAGGLER, pending

        if deadline is not None and now >= deadline:
            still = [c.name for c in launcher.children if c.returncode is None]
            log.error(
                "timeout of %.3g s exceeded; stopping the topology (still running: %s)",
                timeout,
                ", ".join(still) or "none",
            )
            launcher.why = f"timeout of {timeout:.3g} s exceeded"
            return EXIT_TIMEOUT, []
        time.sleep(0.05)

