"""The remote end of an SSH-started process: ``python -m geomx.launch.remote -- ARGV ...``.

An SSH session without a terminal gets no signal when its connection goes away, so a process started
over SSH would outlive a launcher that died or stopped the topology. This wrapper starts ``ARGV`` in a
session (process group) of its own and stops that whole group (SIGTERM, SIGKILL after
:data:`KILL_AFTER` seconds) as soon as its standard input reaches end-of-file: the launcher keeps the
SSH client's input open while it wants the process to run, and the input also ends when the SSH
connection breaks. Its exit status is ``ARGV``'s (128 + N for signal N), which SSH passes back.

The wrapper itself may die without a chance to clean up (SIGKILL, the OOM killer). So that the command
cannot outlive it, a small guard process asks the kernel (Linux's ``PR_SET_PDEATHSIG``) for a signal
when the wrapper dies, and then stops the command's group the same way (SIGTERM, SIGKILL after
:data:`KILL_AFTER` seconds). On a normal end the wrapper ends the guard.

Free of MXNet imports, like the rest of the launcher.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, List, Optional

#: Seconds between SIGTERM and SIGKILL when the group is stopped.
KILL_AFTER = 5.0

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _stop_group(pgid: int, ended: Callable[[], bool]) -> None:
    """SIGTERM to the group, up to :data:`KILL_AFTER` seconds for ``ended()``, then SIGKILL."""
    _signal_group(pgid, signal.SIGTERM)
    end = time.monotonic() + KILL_AFTER
    while not ended() and time.monotonic() < end:
        time.sleep(0.05)
    _signal_group(pgid, signal.SIGKILL)


def _guard(pgid: int, wrapper: int) -> int:
    """The guard (``remote.py --guard PGID WRAPPER_PID``, run as a file so that it imports nothing of
    geomx, whose package would load MXNet in a worker's environment): waits for SIGTERM, which the
    kernel sends when the wrapper dies (``PR_SET_PDEATHSIG``, asked for here: if the wrapper died
    before that, this process's parent is another one already), then stops the group. A separate
    process, because nothing runs in a SIGKILLed wrapper."""
    def stop(*_: object) -> None:
        _stop_group(pgid, lambda: not _signal_group(pgid, 0))
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != wrapper:
        stop()
    while True:
        signal.pause()


class _Group:
    def __init__(self, argv: List[str]):
        self.child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
        self.lock = threading.Lock()
        self.stopping = False
        self.guard: Optional[subprocess.Popen] = None
        if sys.platform.startswith("linux"):  # PR_SET_PDEATHSIG is Linux's
            self.guard = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--guard", str(self.child.pid), str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)

    def end_guard(self) -> None:
        if self.guard is not None:
            self.guard.kill()
            self.guard.wait()

    def stop(self) -> None:
        with self.lock:
            if self.stopping:
                return
            self.stopping = True
        _stop_group(self.child.pid, lambda: self.child.poll() is not None)

    def watch_stdin(self) -> None:
        try:
            while os.read(0, 65536):
                pass
        except OSError:
            pass
        self.stop()


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--guard"]:
        return _guard(int(args[1]), int(args[2]))
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: python -m geomx.launch.remote -- COMMAND ...", file=sys.stderr)
        return 2
    try:
        group = _Group(args)
    except OSError as exc:
        print(f"geomx.launch.remote: cannot start {args[0]}: {exc.strerror}", file=sys.stderr)
        return 127 if isinstance(exc, FileNotFoundError) else 126
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, lambda *_: threading.Thread(target=group.stop, daemon=True).start())
    threading.Thread(target=group.watch_stdin, daemon=True).start()
    while True:
        try:
            code = group.child.wait()
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for clarity
            continue
    # Whatever the command left in its group (children it started) goes with it.
    _signal_group(group.child.pid, signal.SIGKILL)
    group.end_guard()
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
