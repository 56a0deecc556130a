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

import os
import signal
import subprocess
import sys
import threading
import time
from typing import List, Optional

#: Seconds between SIGTERM and SIGKILL when the group is stopped.
KILL_AFTER = 5.0

# The guard: ``python -c GUARD PGID WRAPPER_PID KILL_AFTER``. It gets SIGTERM when the wrapper dies
# (PR_SET_PDEATHSIG, set by itself: if the wrapper died before that, its parent is already another
# process) and then stops the group. A separate process, because nothing runs in a SIGKILLed wrapper.
GUARD = """
import ctypes, os, signal, sys, time
pgid, wrapper, kill_after = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
def alive():
    try:
        os.killpg(pgid, 0)
        return True
    except OSError:
        return False
def stop(*_):
    try:
        os.killpg(pgid, signal.SIGTERM)
    except OSError:
        os._exit(0)
    end = time.monotonic() + kill_after
    while alive() and time.monotonic() < end:
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
    os._exit(0)
signal.signal(signal.SIGTERM, stop)
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
if os.getppid() != wrapper:
    stop()
while True:
    signal.pause()
"""


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


class _Group:
    def __init__(self, argv: List[str]):
        self.child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
        self.lock = threading.Lock()
        self.stopping = False
        self.guard: Optional[subprocess.Popen] = None
        if sys.platform.startswith("linux"):  # PR_SET_PDEATHSIG is Linux's
            self.guard = subprocess.Popen(
                [sys.executable, "-c", GUARD, str(self.child.pid), str(os.getpid()), str(KILL_AFTER)],
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
        _signal_group(self.child.pid, signal.SIGTERM)
        end = time.monotonic() + KILL_AFTER
        while self.child.poll() is None and time.monotonic() < end:
            time.sleep(0.05)
        _signal_group(self.child.pid, signal.SIGKILL)

    def watch_stdin(self) -> None:
        try:
            while os.read(0, 65536):
                pass
        except OSError:
            pass
        self.stop()


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
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
