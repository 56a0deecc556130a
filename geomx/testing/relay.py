"""The processes the emulated WAN runs inside its namespaces (``python -m geomx.testing.wan relay|sample``).

The delaying relay (started in every data center namespace by ``Wan.create`` when the spec has
``delay=``) forwards each redirected TCP connection to its original destination, every chunk
``delay`` after it arrived; the sampler (started in the router namespace by ``Wan.start_sampling``)
records every link's byte counters at a fixed interval.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Sequence

from .links import parse_proc_net_dev

_SO_ORIGINAL_DST = 80
_RELAY_CHUNK = 1 << 16
_RELAY_QUEUE_CHUNKS = 128  # 8 MB per direction


def _relay_pipe(src, dst, delay: float) -> None:
    """Forward ``src`` -> ``dst``, each chunk ``delay`` seconds after it was read."""
    import queue
    import socket

    q: "queue.Queue" = queue.Queue(maxsize=_RELAY_QUEUE_CHUNKS)

    def reader() -> None:
        try:
            while True:
                data = src.recv(_RELAY_CHUNK)
                if not data:
                    break
                q.put((time.monotonic() + delay, data))
        except OSError:
            pass
        q.put(None)

    threading.Thread(target=reader, daemon=True).start()
    try:
        while True:
            item = q.get()
            if item is None:
                break
            due, data = item
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _relay_connection(client, delay: float, mark: int) -> None:
    import socket
    import struct

    try:
        raw = client.getsockopt(socket.SOL_IP, _SO_ORIGINAL_DST, 16)
        port = struct.unpack("!H", raw[2:4])[0]
        host = socket.inet_ntoa(raw[4:8])
        time.sleep(delay)  # connection set-up crosses the WAN too
        upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        upstream.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        upstream.connect((host, port))
    except OSError:
        client.close()
        return
    for s in (client, upstream):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    a = threading.Thread(target=_relay_pipe, args=(client, upstream, delay), daemon=True)
    b = threading.Thread(target=_relay_pipe, args=(upstream, client, delay), daemon=True)
    a.start()
    b.start()
    a.join()
    b.join()
    client.close()
    upstream.close()


def relay_main(port: int, delay_ms: float, mark: int) -> int:
    import socket

    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(256)
    print("ready", flush=True)
    # Nobody reads the pipe after "ready": never block on it.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    delay = delay_ms / 1e3
    while True:
        client, _ = srv.accept()
        threading.Thread(target=_relay_connection, args=(client, delay, mark), daemon=True).start()


def sample_main(ifaces: Sequence[str], interval: float, out: str) -> int:
    """Read ``/proc/net/dev`` (this process's namespace) every ``interval`` seconds until SIGTERM,
    then write the samples to ``out`` as JSON: ``[[monotonic time, {iface: [rx, tx]}], ...]``."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    samples = []
    print("ready", flush=True)
    while not stop.is_set():
        with open("/proc/net/dev") as f:
            text = f.read()
        samples.append((time.monotonic(), parse_proc_net_dev(text, ifaces)))
        stop.wait(interval)
    with open(out, "w") as f:
        json.dump(samples, f)
    return 0
