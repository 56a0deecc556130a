"""Capture the TCP payload crossing every interface of this network namespace (run it with
``ip netns exec NS``; needs root) and report whether given byte patterns appeared in any flow.

Usage: ``wan_capture.py OUT.json HEX_PATTERN ...``. Prints ``READY`` once capturing; on SIGTERM writes
``{"bytes": total payload bytes, "found": [one bool per pattern]}`` to OUT.json and exits.
"""
import collections
import json
import signal
import socket
import struct
import sys

out_path, patterns = sys.argv[1], [bytes.fromhex(h) for h in sys.argv[2:]]
flows = collections.defaultdict(bytearray)
stop = False


def on_term(*_):
    global stop
    stop = True


signal.signal(signal.SIGTERM, on_term)
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE (root): no drops
sock.settimeout(0.2)
print("READY", flush=True)
while not stop:
    try:
        frame, addr = sock.recvfrom(1 << 17)
    except (socket.timeout, InterruptedError):
        continue
    ip = frame[14:]  # Ethernet header (veth and lo)
    if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != socket.IPPROTO_TCP:
        continue
    ihl = (ip[0] & 0x0F) * 4
    total = struct.unpack("!H", ip[2:4])[0]
    tcp = ip[ihl:total]
    payload = tcp[(tcp[12] >> 4) * 4:]
    if payload:
        # One flow per (addresses, ports, direction); a packet seen twice (lo) only repeats bytes.
        flows[(ip[12:20], tcp[:4], addr[2])] += payload
with open(out_path, "w") as f:
    json.dump({"bytes": sum(len(b) for b in flows.values()),
               "found": [any(p in b for b in flows.values()) for p in patterns]}, f)
