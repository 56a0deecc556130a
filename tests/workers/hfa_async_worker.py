"""HFA with dist_async: the master worker's store must be refused with a clear error."""
import mxnet as mx

import geomx  # noqa: F401

mx.kv.create("dist_async")
print("NOT REFUSED", flush=True)
