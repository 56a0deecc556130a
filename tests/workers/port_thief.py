"""A node command for the port-race test: before running ``geomx.node``, a scheduler tries to take its
own port the way another program starting at the same moment could (bind and listen on it). Without
the launcher holding the port, that succeeds and the scheduler then fails with "Address already in
use"; with it, the bind fails and the scheduler adopts the launcher's socket."""
import os
import runpy
import socket
import sys

role = os.environ.get("DMLC_ROLE_GLOBAL") or os.environ.get("DMLC_ROLE")
stolen = None
if role in ("scheduler", "global_scheduler"):
    port = int(os.environ["DMLC_PS_GLOBAL_ROOT_PORT" if role == "global_scheduler" else "DMLC_PS_ROOT_PORT"])
    thief = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        thief.bind(("127.0.0.1", port))
        thief.listen(1)
        stolen = thief  # kept open while the scheduler runs, as the other program would
        print(f"THIEF took port {port}", flush=True)
    except OSError as exc:
        thief.close()
        print(f"THIEF could not take port {port}: {exc.strerror}", flush=True)
sys.argv = ["geomx.node"]
runpy.run_module("geomx.node", run_name="__main__")
