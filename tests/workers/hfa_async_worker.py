"""dist_async with a feature that needs dist_sync (HFA, ESync, P3, set in the environment): the
master worker's store must be refused with a clear error (a party worker's store is created fine:
only the master worker chooses the synchronisation mode)."""
import mxnet as mx

import geomx  # noqa: F401

kv = mx.kv.create("dist_async")
if kv.is_master_worker:
    print("NOT REFUSED", flush=True)
