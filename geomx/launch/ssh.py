"""Starting a topology file's processes on their hosts over SSH (the OpenSSH client).

One multiplexed connection per host (``ControlMaster``), opened and checked before any process starts;
every process is one SSH session over it, in BatchMode (never a password prompt), running
``python -m geomx.launch.remote -- ARGV`` on the host (see geomx/launch/remote.py: the process group
is stopped when the session's input ends). The supervisor keeps each session's input open while the
process may run and closes it to stop it, so a stop reaches every host, and a launcher that dies
takes its remote processes with it.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import subprocess
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

from .layout import ProcessSpec


class SSHError(RuntimeError):
    """A host could not be reached (the message names it and carries SSH's own words)."""


#: Options of every SSH command: no prompts.
BASE_OPTIONS = ["-o", "BatchMode=yes"]

#: Seconds between the SSH client's keep-alive probes of a host.
ALIVE_INTERVAL = 5


def keep_alive_options(silent_for: float) -> List[str]:
    """A connection is dropped once its host has not answered for about ``silent_for`` seconds (at least
    15): the global tier's outage window, so that a WAN outage it rides out does not end the sessions,
    and with them the processes, of the site behind the link."""
    probes = max(3, -(-int(silent_for) // ALIVE_INTERVAL) + 1)
    return ["-o", f"ServerAliveInterval={ALIVE_INTERVAL}", "-o", f"ServerAliveCountMax={probes}"]


class Connections:
    """The master connections to ``hosts`` (SSH targets); a host silent for ``silent_for`` seconds is
    taken to be lost."""

    def __init__(self, hosts: Sequence[str], config: Optional[str] = None, connect_timeout: float = 20.0,
                 silent_for: float = 15.0):
        if shutil.which("ssh") is None:
            raise SSHError("the OpenSSH client (ssh) is not installed: apt-get install openssh-client")
        self.hosts = list(dict.fromkeys(hosts))
        self.options = list(BASE_OPTIONS) + keep_alive_options(silent_for) + (["-F", config] if config else [])
        self.connect_timeout = connect_timeout
        # Short: a control socket path must fit in 108 bytes (%C is 40 hex digits).
        self.dir = tempfile.mkdtemp(prefix="gx-ssh-")
        self.control = ["-o", f"ControlPath={self.dir}/%C"]
        self.masters: Dict[str, subprocess.Popen] = {}

    def open(self) -> None:
        """Open every master connection; raise :class:`SSHError` naming the first host that fails."""
        for host in self.hosts:
            # The master's own session waits for its input to end: a launcher that dies (its end of the
            # pipe closes) takes the connection down with it, instead of leaving an ssh behind.
            self.masters[host] = subprocess.Popen(
                ["ssh", *self.options, *self.control, "-o", "ControlMaster=yes", "-o", "ControlPersist=no",
                 "-o", f"ConnectTimeout={int(self.connect_timeout)}", host, "cat >/dev/null"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.connect_timeout + 5
        for host, master in self.masters.items():
            while True:
                if master.poll() is not None:
                    out = master.stdout.read().decode(errors="replace").strip() if master.stdout else ""
                    raise SSHError(f"cannot reach host {host} over SSH (exit {master.returncode}): {out}")
                check = subprocess.run(["ssh", *self.options, *self.control, "-O", "check", host],
                                       stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
                if check.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    raise SSHError(f"cannot reach host {host} over SSH: no connection after "
                                   f"{self.connect_timeout:.0f} s")
                time.sleep(0.1)  # polling an external program's state; no event to wait for

    def run(self, host: str, remote_command: str, input: bytes = b"", timeout: float = 60.0) -> str:
        """Run ``remote_command`` on ``host`` over its connection; its output, or :class:`SSHError`."""
        try:
            done = subprocess.run(self.argv(host, remote_command), input=input, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SSHError(f"host {host}: {remote_command!r} did not finish within {timeout:.0f} s") from None
        if done.returncode != 0:
            raise SSHError(f"host {host}: {remote_command!r} failed (exit {done.returncode}): "
                           f"{done.stderr.decode(errors='replace').strip()}")
        return done.stdout.decode(errors="replace")

    def generate_keys(self, sites: Sequence[Tuple[str, str]], pythons: Dict[str, str]) -> str:
        """CURVE keys for a run: each site's pair generated on its host (``sites``: name, SSH target), whose
        secret half never leaves it; every public key copied to every host. Returns the directory, the same
        path on every host (private to this run, mode 0700)."""
        directory = f"/tmp/geomx-keys-{secrets.token_hex(8)}"
        public = {}
        for name, host in sites:
            public[name] = self.run(host, f"umask 077 && mkdir -p {directory} && {shlex.quote(pythons[host])} -m "
                                          f"geomx.security generate --dir {directory} --name {shlex.quote(name)} "
                                          f">/dev/null && cat {directory}/{shlex.quote(name)}.key").encode()
        for host in self.hosts:
            for name, key in public.items():
                self.run(host, f"umask 077 && mkdir -p {directory} && cat > {directory}/{shlex.quote(name)}.key",
                         input=key)
        return directory

    def remove(self, directory: str) -> None:
        """Delete a run's key directory on every host (best effort: the run is over)."""
        for host in self.hosts:
            try:
                self.run(host, f"rm -rf {shlex.quote(directory)}", timeout=30)
            except SSHError:
                pass

    def argv(self, host: str, remote_command: str) -> List[str]:
        return ["ssh", *self.options, *self.control, "-o", "ControlMaster=no", host, remote_command]

    def close(self) -> None:
        for master in self.masters.values():
            if master.stdin is not None:
                master.stdin.close()
            if master.poll() is None:
                try:
                    os.killpg(master.pid, 15)
                except ProcessLookupError:
                    pass
            try:
                master.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(master.pid, 9)
                master.wait()
            if master.stdout is not None:
                master.stdout.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def remote_command(spec: ProcessSpec, variables: Sequence[str], python: str) -> str:
    """The shell line a host runs for ``spec``: its directory, its variables, the wrapper, its argv."""
    assigns = " ".join(f"{k}={shlex.quote(spec.env[k])}" for k in variables)
    cd = f"cd {shlex.quote(spec.cwd)} && " if spec.cwd else ""
    return f"{cd}exec env {assigns} {shlex.quote(python)} -m geomx.launch.remote -- {shlex.join(spec.argv)}"
