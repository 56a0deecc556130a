"""What CURVE costs per byte: one message of N bytes from a DEALER to a ROUTER and back over loopback
TCP (two contexts, as two geomx nodes have), plain and with CURVE, with geomx's own socket settings
(transport.bind_router / connect_dealer on two event loops).

    python benchmarks/bench_curve.py                 # 1 MB, 4 MB and 21.6 MB (the suite's big model)

Per size it prints the median round trip plain and with CURVE, the difference (= encrypt + decrypt,
twice) and the CURVE rate that implies (bytes encrypted-and-decrypted per second). With it the cost per
iteration of a model can be estimated: every byte on a party link is encrypted once and decrypted once.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import zmq

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from geomx import security  # noqa: E402
from geomx.transport import EventLoop, bind_router, connect_dealer  # noqa: E402
from geomx.wire import Message, MsgType  # noqa: E402


def round_trips(nbytes: int, keys_dir: str | None, repeats: int) -> list:
    server_keys = client_keys = None
    if keys_dir is not None:
        server_keys = security.load(f"{keys_dir}/central.key_secret", keys_dir, None, True)
        client_keys = security.load(f"{keys_dir}/party0.key_secret", keys_dir, "central", True)
    server = EventLoop(zmq.Context(), name="server", keys=server_keys)
    client = EventLoop(zmq.Context(), name="client", keys=client_keys)
    got = []
    link, port = bind_router(server, 0, "bench-listener", cross_party=True)
    server.add(link, lambda m, origin: origin.reply(Message(MsgType.RESPONSE, req_id=m.req_id, data=m.data)),
               routed=True)
    up = connect_dealer(client, "127.0.0.1", port, b"bench", "bench-link", peer="bench", cross_party=True)
    client.add(up, lambda m, origin: got.append(m), routed=False)
    data = np.ones(nbytes // 4, np.float32)
    times = []
    try:
        for i in range(repeats + 1):
            got.clear()
            t = time.perf_counter()
            up.send(Message(MsgType.PUSH, req_id=i, data=data))
            while not got:
                server.run_once(0.0005)
                client.run_once(0.0005)
            if i:  # the first one includes the handshake
                times.append(time.perf_counter() - t)
    finally:
        for loop in (server, client):
            loop.close()
            loop.ctx.term()
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-mb", default="1,4,21.6")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as keys:
        security.generate_topology_keys(keys, ["central", "party0"])
        print("| message | plain round trip (ms) | CURVE round trip (ms) | CURVE extra (ms) | "
              "CURVE rate (MB/s, encrypt + decrypt) |")
        print("|---|---|---|---|---|")
        for mb in (float(x) for x in args.sizes_mb.split(",")):
            n = int(mb * 1e6)
            plain = statistics.median(round_trips(n, None, args.repeats))
            curve = statistics.median(round_trips(n, keys, args.repeats))
            extra = curve - plain
            rate = 2 * n / extra / 1e6 if extra > 0 else float("inf")
            print(f"| {mb:g} MB | {plain * 1e3:.1f} | {curve * 1e3:.1f} | {extra * 1e3:.1f} | {rate:.0f} |")
    print(f"\n(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
