"""Engine-side delivery of pulled values (geomx/delivery.py, csrc/_delivery.pyx), in one process: the
reply is a future resolved by another thread, as geomx's I/O thread does; MXNet's engine is real."""
from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import numpy as np
import pytest

# geomx.delivery is the MXNet front end's (it imports mxnet): where MXNet is not installed (the core alone)
# the module is skipped.
mx = pytest.importorskip("mxnet")

from geomx import delivery  # noqa: E402
from geomx.errors import PeerDeadError  # noqa: E402

pytestmark = [pytest.mark.unit, pytest.mark.skipif(not delivery.COMPILED, reason="geomx._delivery is not built")]


def resolve_later(fut: cf.Future, value=None, error=None, delay: float = 0.2) -> threading.Thread:
    def run():
        time.sleep(delay)
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(value)
    t = threading.Thread(target=run)
    t.start()
    return t


def test_readers_before_the_pull_see_the_old_value_and_after_it_the_reply():
    out = mx.nd.array(np.full((3, 4), 7, np.float32))
    before = out * 1  # queued before the pull
    fut = cf.Future()
    delivery.deliver(fut, out)
    after = out + 1   # queued after: must wait for the reply
    reply = np.arange(12, dtype=np.float32)
    t = resolve_later(fut, reply)
    np.testing.assert_array_equal(before.asnumpy(), np.full((3, 4), 7, np.float32))
    np.testing.assert_array_equal(after.asnumpy(), reply.reshape(3, 4) + 1)
    np.testing.assert_array_equal(out.asnumpy(), reply.reshape(3, 4))
    t.join()


def test_reply_already_there_when_the_operation_runs():
    out = mx.nd.zeros((1000,))
    fut = cf.Future()
    fut.set_result(np.arange(1000, dtype=np.float32))
    delivery.deliver(fut, out)
    np.testing.assert_array_equal(out.asnumpy(), np.arange(1000, dtype=np.float32))


def test_operation_waits_for_earlier_writers_of_the_array():
    out = mx.nd.zeros((50,))
    slow = mx.nd.ones((50,))
    for _ in range(20):
        slow = slow * 1  # a chain the engine runs before the write below
    out += slow          # an earlier writer of out
    fut = cf.Future()
    fut.set_result(np.full(50, 3, np.float32))
    delivery.deliver(fut, out)
    np.testing.assert_array_equal(out.asnumpy(), np.full(50, 3, np.float32))


def test_many_pulls_in_flight_then_resolved_in_reverse_order():
    outs = [mx.nd.zeros((i + 1,)) for i in range(200)]
    futs = [cf.Future() for _ in outs]
    for fut, out in zip(futs, outs):
        delivery.deliver(fut, out)
    for i in reversed(range(len(futs))):
        futs[i].set_result(np.full(i + 1, i, np.float32))
    for i, out in enumerate(outs):
        np.testing.assert_array_equal(out.asnumpy(), np.full(i + 1, i, np.float32))
    mx.nd.waitall()
    # Finished deliveries are let go (no leak across a long training run). A sweep, every _SWEEP_EVERY
    # deliveries, drops the ones the engine has completed: after a waitall every earlier one is, so the
    # next _SWEEP_EVERY deliveries pass a sweep that leaves at most those. (Counting right after
    # deliveries whose engine operations had not run yet failed once on a loaded machine: 128 kept.)
    def deliver_many(n):
        for _ in range(n):
            fut = cf.Future()
            fut.set_result(np.zeros(1, np.float32))
            delivery.deliver(fut, outs[0])

    deliver_many(2 * delivery._SWEEP_EVERY)
    mx.nd.waitall()
    deliver_many(delivery._SWEEP_EVERY)
    assert len(delivery._outstanding) <= delivery._SWEEP_EVERY
    mx.nd.waitall()


def test_a_failed_request_reaches_the_waiters_as_an_error_naming_the_geomx_error():
    out = mx.nd.zeros((8,))
    fut = cf.Future()
    delivery.deliver(fut, out)
    t = resolve_later(fut, error=PeerDeadError("global server 0 stopped answering"))
    with pytest.raises(mx.base.MXNetError, match="geomx.errors.PeerDeadError: global server 0 stopped answering"):
        out.asnumpy()
    t.join()
    # The engine goes on: a later delivery into a fresh array works.
    ok = mx.nd.zeros((8,))
    fut2 = cf.Future()
    fut2.set_result(np.ones(8, np.float32))
    delivery.deliver(fut2, ok)
    np.testing.assert_array_equal(ok.asnumpy(), np.ones(8, np.float32))


def test_a_reply_of_the_wrong_size_fails_instead_of_writing():
    out = mx.nd.zeros((8,))
    fut = cf.Future()
    fut.set_result(np.ones(9, np.float32))
    delivery.deliver(fut, out)
    with pytest.raises(mx.base.MXNetError, match="could not deliver"):
        out.asnumpy()


def test_reply_of_another_dtype_is_converted():
    out = mx.nd.zeros((4,), dtype=np.float16)
    fut = cf.Future()
    fut.set_result(np.array([1.5, 2, 3, 4], np.float32))
    delivery.deliver(fut, out)
    np.testing.assert_array_equal(out.asnumpy(), np.array([1.5, 2, 3, 4], np.float16))


def test_weights_in_an_mkldnn_layout_after_an_inference_pass():
    from mxnet import gluon

    net = gluon.nn.Conv2D(8, 3, in_channels=3)
    net.initialize()
    x = mx.nd.array(np.random.RandomState(0).standard_normal((2, 3, 8, 8)).astype(np.float32))
    net(x)  # inference: MKLDNN re-lays out the weight for later passes
    mx.nd.waitall()
    weight = net.weight.data()
    assert not delivery._directly_writable(weight)  # so the reply goes through a staging array
    new = np.random.RandomState(1).standard_normal(weight.shape).astype(np.float32)
    fut = cf.Future()
    delivery.deliver(fut, weight)
    t = resolve_later(fut, new.reshape(-1))
    got = net(x).asnumpy()
    expected = mx.nd.Convolution(x, mx.nd.array(new), net.bias.data(), kernel=(3, 3), num_filter=8).asnumpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(weight.asnumpy(), new)
    t.join()


def test_custom_operator_fallback_gives_the_same_result():
    out = mx.nd.zeros((2, 3))
    fut = cf.Future()
    delivery._deliver_custom(fut, out)
    t = resolve_later(fut, np.arange(6, dtype=np.float32))
    np.testing.assert_array_equal(out.asnumpy(), np.arange(6, dtype=np.float32).reshape(2, 3))
    t.join()


def _hold_reading(array: mx.nd.NDArray):
    """An engine operation that reads ``array`` and completes only when the returned function is
    called: later writers of ``array`` (such as MKLDNN's re-layout) wait behind it."""
    gate = mx.nd.zeros((1,))
    slot = delivery._delivery.Delivery(gate, gate.handle.value, 4)
    delivery.push_operation(slot, writes=gate, reads=array, name=b"test_gate")

    def release():
        slot.provide(np.zeros(1, np.float32))
        gate.wait_to_read()
    return release


def test_weights_re_laid_out_by_mkldnn_after_the_pull_was_issued():
    """The pattern of a dummy inference pass right before pulling the initial weights: MKLDNN's
    re-layout of the weight (an engine write pushed while the pass runs) is still queued when the pull
    is issued, so the array looks writable then and is in an MKLDNN layout when the reply is written."""
    from mxnet import gluon

    net = gluon.nn.Conv2D(8, 3, in_channels=3)
    net.initialize()
    x = mx.nd.array(np.random.RandomState(0).standard_normal((2, 3, 8, 8)).astype(np.float32))
    weight = net.weight.data()
    release = _hold_reading(weight)     # keeps the re-layout queued until the pull is issued
    net(x).wait_to_read()               # inference: the pass ran and queued the re-layout of weight
    assert delivery._directly_writable(weight)  # not re-laid out yet
    new = np.random.RandomState(1).standard_normal(weight.shape).astype(np.float32)
    fut = cf.Future()
    fut.set_result(new.reshape(-1))
    delivery.deliver(fut, weight)       # queued behind the re-layout
    release()
    np.testing.assert_array_equal(weight.asnumpy(), new)
    got = net(x).asnumpy()
    expected = mx.nd.Convolution(x, mx.nd.array(new), net.bias.data(), kernel=(3, 3), num_filter=8).asnumpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_mkldnn_builds_give_the_operation_the_layout_reset():
    if mx.runtime.Features().is_enabled("MKLDNN"):
        assert delivery._address(delivery._INVALIDATE_MKLDNN) != 0
