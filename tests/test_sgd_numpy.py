"""The global server's numpy path for plain SGD (geomx.optimizer_spec.sgd_step) against MXNet's own
updater: same weights over many steps, same bookkeeping (update counts, scheduler, multipliers)."""
from __future__ import annotations

import numpy as np
import pytest

from geomx.optimizer_spec import is_plain_sgd, sgd_step

# The oracle is MXNet's updater: where MXNet is not installed (the core alone) the module is skipped.
mx = pytest.importorskip("mxnet")

pytestmark = pytest.mark.unit


def _pair(**params):
    """Two identical optimizers: one for MXNet's updater, one for sgd_step."""
    def make():
        p = dict(params)
        sched = p.pop("scheduler", None)
        if sched is not None:
            p["lr_scheduler"] = mx.lr_scheduler.FactorScheduler(step=3, factor=0.5)
        opt = mx.optimizer.create("sgd", **p)
        opt.set_lr_mult({1: 0.5})
        opt.set_wd_mult({1: 2.0})
        return opt
    return make(), make()


@pytest.mark.parametrize("params", [
    {"learning_rate": 0.1},
    {"learning_rate": 0.05, "wd": 0.01, "rescale_grad": 0.25},
    {"learning_rate": 0.05, "clip_gradient": 0.3, "rescale_grad": 2.0},
    {"learning_rate": 0.2, "wd": 0.001, "scheduler": True},
], ids=["plain", "wd-rescale", "clip", "scheduler-multipliers"])
def test_numpy_sgd_follows_mxnet_updater(params):
    ref_opt, opt = _pair(**params)
    assert is_plain_sgd(opt)
    updater = mx.optimizer.get_updater(ref_opt)
    rng = np.random.RandomState(0)
    weights = {k: rng.standard_normal(n).astype(np.float32) for k, n in ((0, 1000), (1, 37))}
    ref = {k: mx.nd.array(w) for k, w in weights.items()}
    for _ in range(10):
        for k in weights:
            g = rng.standard_normal(weights[k].size).astype(np.float32)
            before = weights[k]
            weights[k] = sgd_step(opt, k, before, g)
            assert weights[k] is not before  # a new array: the old one may still be in a send
            updater(k, mx.nd.array(g), ref[k])
            np.testing.assert_allclose(weights[k], ref[k].asnumpy(), rtol=2e-6, atol=1e-7)
    assert opt.num_update == ref_opt.num_update and opt._index_update_count == ref_opt._index_update_count


def test_integer_steps_are_exact():
    opt = mx.optimizer.create("sgd", learning_rate=0.5)
    w = np.arange(-8, 8, dtype=np.float32)
    g = np.arange(16, dtype=np.float32) * 2
    np.testing.assert_array_equal(sgd_step(opt, 0, w, g), w - g / 2)


def test_momentum_and_other_optimizers_take_mxnets_path():
    assert not is_plain_sgd(mx.optimizer.create("sgd", learning_rate=0.1, momentum=0.9))
    assert not is_plain_sgd(mx.optimizer.create("adam"))
    assert not is_plain_sgd(mx.optimizer.create("nag", learning_rate=0.1))
