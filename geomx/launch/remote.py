"""The remote end of an SSH-started process: ``python -m geomx.launch.remote -- ARGV ...``.

An SSH session without a terminal gets no signal when its connection goes away, so a process started
over SSH would outlive a launcher that died or stopped the topology. This wrapper starts ``ARGV`` in a
session (process group) of its own and stops that whole group (SIGTERM, SIGKILL after
:data:`KILL_AFTER` seconds) as soon as its standard input reaches end-of-file: the launcher keeps the
SSH client's input open while it wants the process to run, and the input also ends when the SSH
connection breaks. Its exit status is ``ARGV``'s (128 + N for signal N), which SSH passes back.

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
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
