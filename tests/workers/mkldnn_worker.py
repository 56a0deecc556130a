"""Pulls and broadcasts into conv-net parameters that an inference forward pass left in MKLDNN layout
(MXNet refuses plain host copies into those). The master initialises through gluon.Trainer."""
import argparse
import os
import sys

import mxnet as mx
import numpy as np
from mxnet import gluon

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
from utils import build_cnn  # noqa: E402

import geomx  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--slice", type=int, required=True)
    args = p.parse_args()
    kv = mx.kv.create("dist_sync")
    net = build_cnn()
    net(mx.nd.ones((2, 1, 28, 28))).wait_to_read()  # inference forward: MKLDNN layouts
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1}, kvstore=kv,
                            update_on_kvstore=False)
    if kv.is_master_worker:
        geomx.initialize_trainer(trainer)
        return 0
    params = trainer._params  # the store keys are indices into this (name-sorted) list
    net(mx.nd.ones((2, 1, 28, 28))).wait_to_read()
    geomx.initialize_trainer(trainer)  # broadcast into MKLDNN-layout arrays
    net(mx.nd.ones((2, 1, 28, 28))).wait_to_read()
    for i, prm in enumerate(params):
        kv.pull(i, out=prm.data())
    first = params[0].data().asnumpy()
    if not np.isfinite(first).all():
        print("MKLDNN FAIL", flush=True)
        return 1
    print("MKLDNN OK", args.slice, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
