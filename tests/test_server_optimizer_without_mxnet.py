"""A global server whose optimizer runs in numpy never imports MXNet: a fresh interpreter loads the
global server's modules, sets Adam (and plain SGD) as the master worker's spec, updates, checkpoints and
restores, and reports whether ``mxnet`` is in ``sys.modules``; an optimizer only MXNet runs (NAG) then
imports it, which shows the probe can see it. Where MXNet is not installed (the core alone: ``pip install geomx``),
NAG is refused with a GeoMXError that names the ``mxnet`` extra, which the master worker gets as the reply."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.system

PROBE = textwrap.dedent("""
    import json, sys
    import numpy as np
    import geomx.node  # the global server's entry point (python -m geomx.node)
    from geomx.errors import GeoMXError
    from geomx.servers.global_server import GlobalServer  # noqa: F401
    from geomx.servers.updater import Updater

    def spec(name, **params):  # as geomx.optimizer_spec.optimizer_to_spec writes it on the worker
        return {"name": name, "params": {"learning_rate": 0.01, "wd": 0.0, "rescale_grad": 1.0,
                "clip_gradient": None, "begin_num_update": 0, "multi_precision": False, **params},
                "lr_mult": {}, "wd_mult": {}, "num_update": 0}

    report = {"after_import": "mxnet" in sys.modules}
    for name, params in (("adam", {"beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8, "lazy_update": True}),
                         ("sgd", {"momentum": 0.0, "lazy_update": True})):
        updater = Updater(spec(name, **params))
        store = updater.apply(0, 0, np.ones(10, np.float32), np.full(10, 0.5, np.float32))
        again = Updater(spec(name, **params))
        counts, num_update = updater.update_counts()
        again.restore_counts(counts.items(), num_update)
        again.load_states(*updater.states_to_wire())
        again.apply(0, 0, store, np.full(10, 0.5, np.float32))
        report[name] = [updater.engine, "mxnet" in sys.modules]
    try:
        report["nag"] = [Updater(spec("nag", momentum=0.9)).engine, "mxnet" in sys.modules]
    except GeoMXError as exc:  # MXNet is not installed
        report["nag"] = [str(exc), "mxnet" in sys.modules]
    print(json.dumps(report))
""")


def test_global_server_with_adam_does_not_import_mxnet():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    for name in ("DMLC_ROLE", "DMLC_ROLE_GLOBAL", "DMLC_PS_ROOT_URI", "DMLC_PS_ROOT_PORT"):
        env.pop(name, None)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    nag = report.pop("nag")
    assert report == {"after_import": False, "adam": ["numpy", False], "sgd": ["numpy", False]}, report
    if importlib.util.find_spec("mxnet") is not None:
        assert nag == ["mxnet", True]
    else:
        assert nag[1] is False and "MXNet is not installed" in nag[0] and "geomx[mxnet]" in nag[0], nag
