"""BSC with the servers' optimizer where the parties' local servers cannot run it (issue 28): the master
worker's call must be refused with a clear error. ``late``: the optimizer set after kv.init (the local
servers learned the codec without it); ``central``: central workers train (DMLC_ENABLE_CENTRAL_WORKER=1,
their gradients would be summed with the parties' steps); ``dcasgd``: an optimizer only MXNet runs."""
import sys

import mxnet as mx

import geomx  # noqa: F401
from geomx.errors import GeoMXError

what = sys.argv[1]
kv = mx.kv.create("dist_sync")
if kv.is_master_worker:
    kv.set_gradient_compression({"type": "bsc", "threshold": 0.01})
    optimizer = mx.optimizer.DCASGD(learning_rate=0.1) if what == "dcasgd" else mx.optimizer.Adam()
    if what == "late":
        kv.init(0, mx.nd.zeros((10,)))
    try:
        kv.set_optimizer(optimizer)
    except GeoMXError as exc:
        print(f"REFUSED {exc}", flush=True)
        sys.exit(0)
    print("NOT REFUSED", flush=True)
    sys.exit(1)
