"""A competing bulk TCP flow for the benchmarks (``suite.py --competing-flow``): ``sink PORT`` accepts
connections and discards what they send; ``source HOST PORT`` sends as fast as TCP lets it until
killed. Started inside the emulated WAN's namespaces, so the flow shares a party's access link with
geomx's traffic. Prints ``ready`` once listening / connected."""
import socket
import sys
import threading


def sink(port: int) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(16)
    print("ready", flush=True)

    def drain(conn: socket.socket) -> None:
        while conn.recv(1 << 16):
            pass

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=drain, args=(conn,), daemon=True).start()


def source(host: str, port: int) -> None:
    conn = socket.create_connection((host, port), timeout=30)
    print("ready", flush=True)
    chunk = bytes(1 << 16)
    while True:
        conn.sendall(chunk)


if __name__ == "__main__":
    if sys.argv[1] == "sink":
        sink(int(sys.argv[2]))
    else:
        source(sys.argv[2], int(sys.argv[3]))
