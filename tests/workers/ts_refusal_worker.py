"""ENABLE_INTER_TS with a combination it cannot serve: the master worker's choice must be refused
with a clear error. ``bsc``: sparse codecs; ``async``: MixedSync (dist_async)."""
import sys

import mxnet as mx

import geomx  # noqa: F401

what = sys.argv[1]
kv = mx.kv.create("dist_async" if what == "async" else "dist_sync")
if kv.is_master_worker:
    if what == "bsc":
        kv.set_gradient_compression({"type": "bsc", "threshold": 0.01})
    print("NOT REFUSED", flush=True)
