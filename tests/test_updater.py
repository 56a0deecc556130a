"""The global server's Updater against one MXNet updater in a single process, for every optimizer path
that keeps state per update: P3 cuts a key into slices, each updated under an index of its own, and the
slices' results must be the whole key's, bit for bit (the optimizers are element-wise). Before the fix a
second slice of a key was updated against the first slice's weights (issue 26: run_p3.sh with the global
server's Adam failed with MXNet's "Incompatible attr ... expected [40000], got [11072]")."""
from __future__ import annotations

import mxnet as mx
import numpy as np
import pytest

from geomx.optimizer_spec import optimizer_to_spec
from geomx.servers.updater import Updater

pytestmark = pytest.mark.unit

KEYS = {0: 1000, 1: 37, 2: 4096}
SLICE = 400  # P3's slice size here: keys 0 and 2 are cut in 3 and 11 slices, the last one partial

OPTIMIZERS = {
    "adam": lambda: mx.optimizer.Adam(learning_rate=0.01, wd=0.001),
    "sgd-momentum": lambda: mx.optimizer.SGD(learning_rate=0.05, momentum=0.9, wd=0.01),
    "nag": lambda: mx.optimizer.NAG(learning_rate=0.05, momentum=0.9),
    "rmsprop": lambda: mx.optimizer.RMSProp(learning_rate=0.01),
    "adagrad": lambda: mx.optimizer.AdaGrad(learning_rate=0.1),
    "sgd-fp32": lambda: mx.optimizer.SGD(learning_rate=0.1),  # the numpy path
}


def _slice_index(key: int, offset: int) -> int:
    """The index a P3 slice updates under (geomx/servers/base.py)."""
    return -(1 + (key << 35) + offset)


def _slices(n: int):
    return [(off, min(SLICE, n - off)) for off in range(0, n, SLICE)]


def _grads(rounds: int, seed: int = 0):
    rng = np.random.RandomState(seed)
    return [{k: rng.standard_normal(n).astype(np.float32) for k, n in KEYS.items()} for _ in range(rounds)]


def _reference(make, init, grads):
    """One MXNet updater over whole keys: what a single process training with this optimizer holds."""
    updater = mx.optimizer.get_updater(make())
    weights = {k: mx.nd.array(v) for k, v in init.items()}
    for round_grads in grads:
        for k, g in round_grads.items():
            updater(k, mx.nd.array(g), weights[k])
    return {k: w.asnumpy() for k, w in weights.items()}


def _sliced(updater, stores, round_grads, order):
    """One round through ``updater`` as the global server under P3 runs it: every slice of every key is
    its own state and index; the key's value is its slices' stores side by side."""
    for k, off, n in order:
        index = k if n == KEYS[k] else _slice_index(k, off)
        stores[(k, off)] = updater.apply(k, index, stores[(k, off)], round_grads[k][off:off + n].copy())


def _init():
    rng = np.random.RandomState(1)
    return {k: rng.standard_normal(n).astype(np.float32) for k, n in KEYS.items()}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_p3_slices_update_like_whole_keys(name):
    make = OPTIMIZERS[name]
    init, grads = _init(), _grads(5)
    want = _reference(make, init, grads)
    updater = Updater(optimizer_to_spec(make()))
    stores = {(k, off): init[k][off:off + n].copy() for k, total in KEYS.items() for off, n in _slices(total)}
    order = [(k, off, n) for k, total in KEYS.items() for off, n in _slices(total)]
    rng = np.random.RandomState(2)
    for round_grads in grads:
        # Slices arrive in any order (priorities, several parties): state must follow the slice.
        _sliced(updater, stores, round_grads, [order[i] for i in rng.permutation(len(order))])
    for k, total in KEYS.items():
        got = np.concatenate([stores[(k, off)] for off, _ in _slices(total)])
        np.testing.assert_array_equal(got, want[k], err_msg=f"{name}, key {k}")


@pytest.mark.parametrize("name", ["adam", "sgd-momentum"])
def test_states_restored_mid_training_continue_like_one_process(name):
    """A checkpoint (or SET_STATES) mid-training: a new Updater gets the counts, the states and the
    stores of the old one, and the next rounds must be those of an uninterrupted run. The restored
    stores are new arrays, so MXNet's copy of the weights must be taken from them."""
    make = OPTIMIZERS[name]
    init, grads = _init(), _grads(6)
    want = _reference(make, init, grads)
    spec = optimizer_to_spec(make())
    first = Updater(spec)
    stores = {(k, off): init[k][off:off + n].copy() for k, total in KEYS.items() for off, n in _slices(total)}
    order = [(k, off, n) for k, total in KEYS.items() for off, n in _slices(total)]
    for round_grads in grads[:3]:
        _sliced(first, stores, round_grads, order)
    counts, num_update = first.update_counts()
    desc, blob = first.states_to_wire()
    second = Updater(spec)
    second.restore_counts(counts.items(), num_update)
    second.load_states(desc, blob.copy())
    stores = {key: value.copy() for key, value in stores.items()}
    for round_grads in grads[3:]:
        _sliced(second, stores, round_grads, order[::-1])
    for k, total in KEYS.items():
        got = np.concatenate([stores[(k, off)] for off, _ in _slices(total)])
        np.testing.assert_array_equal(got, want[k], err_msg=f"{name}, key {k}")


def test_store_replaced_between_updates_is_taken():
    """MXNet's copy of a key's weights is current only while the server's store is the array the last
    update returned: a store replaced in between (a new INIT, a restore) must be what the next step
    starts from."""
    make = OPTIMIZERS["sgd-momentum"]
    updater = Updater(optimizer_to_spec(make()))
    ref = mx.optimizer.get_updater(make())
    store = np.arange(8, dtype=np.float32)
    grad = np.ones(8, dtype=np.float32)
    store = updater.apply(5, 5, store, grad.copy())
    replaced = np.full(8, 3.0, dtype=np.float32)
    got = updater.apply(5, 5, replaced, grad.copy())
    weight = mx.nd.array(np.arange(8, dtype=np.float32))
    ref(5, mx.nd.array(grad), weight)
    weight = mx.nd.array(replaced)
    ref(5, mx.nd.array(grad), weight)  # the momentum state carries over, the weights do not
    np.testing.assert_array_equal(got, weight.asnumpy())


def test_dcasgd_backup_is_per_index():
    """DC-ASGD compensates against the weights the pushing party holds (its backup), kept in the
    optimizer's state of the index being updated (a slice's own index here: MixedSync takes whole keys
    today, but the state must follow the index whatever it is)."""
    make = lambda: mx.optimizer.DCASGD(learning_rate=0.1, lamda=0.04)  # noqa: E731
    updater = Updater(optimizer_to_spec(make()))
    ref = mx.optimizer.get_updater(make())
    rng = np.random.RandomState(3)
    store = rng.standard_normal(50).astype(np.float32)
    weight = mx.nd.array(store)
    index = _slice_index(7, 0)
    for t in range(4):
        grad = rng.standard_normal(50).astype(np.float32)
        backup = (store - 0.01 * t).astype(np.float32)  # what this party last received
        store = updater.apply(7, index, store, grad.copy(), backup)
        if index not in ref.states:
            ref.states[index] = make().create_state(index, weight)
            ref.states_synced[index] = True
        ref.states[index][1][:] = backup
        ref(index, mx.nd.array(grad), weight)
        np.testing.assert_array_equal(store, weight.asnumpy(), err_msg=f"round {t}")


def test_internal_error_names_the_cause_in_one_line():
    """What the other nodes are told of an unexpected error (geomx.errors.internal_error): MXNet's own
    errors carry a whole traceback whose first line says nothing ("Traceback (most recent call last):"),
    which is what every process of the topology showed when run_p3.sh crashed; the cause is last."""
    from geomx.errors import internal_error

    try:
        mx.nd.ones((3,)) + mx.nd.ones((4,))
    except mx.base.MXNetError as exc:
        told = internal_error(exc)
    assert "\n" not in told and told.startswith("internal error: MXNetError: ")
    assert "Traceback" not in told and "broadcast" in told, told
    assert internal_error(KeyError(3)) == "internal error: KeyError: 3"
    assert internal_error(ValueError("a\nb"), "while answering") == "internal error while answering: ValueError: b"
