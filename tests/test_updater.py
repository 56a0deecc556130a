"""The global server's Updater against one MXNet updater in a single process, for every optimizer path
that keeps state per update: P3 cuts a key into slices, each updated under an index of its own, and the
slices' results must be the whole key's, bit for bit (the optimizers are element-wise). Before the fix a
second slice of a key was updated against the first slice's weights (issue 26: run_p3.sh with the global
server's Adam failed with MXNet's "Incompatible attr ... expected [40000], got [11072]")."""
from __future__ import annotations

import json

import numpy as np
import pytest

from geomx.errors import GeoMXError
from geomx.optimizer_spec import optimizer_to_spec
from geomx.servers.updater import Updater, neutral_spec

# The oracle is MXNet's updater: where MXNet is not installed (the core alone) the module is skipped.
mx = pytest.importorskip("mxnet")

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


# -- the engine: numpy where the MXNet spec maps exactly, MXNet's updater otherwise ---------------------

@mx.optimizer.register
class _CustomSGD(mx.optimizer.SGD):  # a user's optimizer, registered under its own name
    pass


def _stepped(sched, updates):
    for n in range(1, updates + 1):
        sched(n)
    return sched


NUMPY_SPECS = {
    "sgd": lambda: mx.optimizer.SGD(learning_rate=0.1),
    "sgd-momentum-wd-clip": lambda: mx.optimizer.SGD(learning_rate=0.05, momentum=0.9, wd=0.01, clip_gradient=0.5,
                                                     rescale_grad=0.5),
    "adam": lambda: mx.optimizer.Adam(learning_rate=0.01, wd=0.001, beta1=0.8, clip_gradient=1.0),
    "adam-resumed": lambda: mx.optimizer.Adam(learning_rate=0.01, begin_num_update=7),
    "rmsprop-centered": lambda: mx.optimizer.RMSProp(learning_rate=0.01, centered=True, clip_weights=2.0),
    "adagrad": lambda: mx.optimizer.AdaGrad(learning_rate=0.1, wd=0.01),
    "factor": lambda: mx.optimizer.SGD(learning_rate=0.1, momentum=0.9, lr_scheduler=mx.lr_scheduler.FactorScheduler(
        step=2, factor=0.5, stop_factor_lr=0.02)),
    "factor-warmup": lambda: mx.optimizer.Adam(learning_rate=0.01, lr_scheduler=mx.lr_scheduler.FactorScheduler(
        step=3, factor=0.7, base_lr=0.01, warmup_steps=2, warmup_begin_lr=0.001)),
    "multifactor": lambda: mx.optimizer.Adam(learning_rate=0.01, lr_scheduler=mx.lr_scheduler.MultiFactorScheduler(
        step=[1, 3], factor=0.3)),
    "cosine": lambda: mx.optimizer.RMSProp(learning_rate=0.01, lr_scheduler=mx.lr_scheduler.CosineScheduler(
        max_update=4, base_lr=0.01, final_lr=0.001)),
    "poly-warmup": lambda: mx.optimizer.SGD(momentum=0.5, lr_scheduler=mx.lr_scheduler.PolyScheduler(
        max_update=6, base_lr=0.1, pwr=3, warmup_steps=2, warmup_mode="constant", warmup_begin_lr=0.05)),
}

MXNET_SPECS = {  # what MXNet's engine keeps, and the reason it names
    "nag": (lambda: mx.optimizer.NAG(learning_rate=0.05, momentum=0.9), "'nag' has no numpy engine"),
    "dcasgd": (lambda: mx.optimizer.DCASGD(learning_rate=0.1), "'dcasgd' has no numpy engine"),
    "signum": (lambda: mx.optimizer.Signum(learning_rate=0.1), "'signum' has no numpy engine"),
    "custom": (lambda: _CustomSGD(learning_rate=0.1), "'_customsgd' has no numpy engine"),
    "factor-stepped": (lambda: mx.optimizer.SGD(learning_rate=0.1, lr_scheduler=_stepped(
        mx.lr_scheduler.FactorScheduler(step=2, factor=0.5, base_lr=0.1), 5)), "already stepped"),
    "multifactor-stepped": (lambda: mx.optimizer.SGD(lr_scheduler=_stepped(
        mx.lr_scheduler.MultiFactorScheduler(step=[2, 4], factor=0.5, base_lr=0.1), 3)), "already stepped"),
    "cosine-rate-overridden": (lambda: mx.optimizer.SGD(learning_rate=0.5, lr_scheduler=mx.lr_scheduler.CosineScheduler(
        max_update=10, base_lr=0.1)), "decays from 0.1"),
    "warmup-to-another-rate": (lambda: mx.optimizer.SGD(learning_rate=0.5, lr_scheduler=mx.lr_scheduler.FactorScheduler(
        step=3, base_lr=0.1, warmup_steps=2)), "warmup ends at 0.1"),
    "poly-past-max-update": (lambda: mx.optimizer.SGD(begin_num_update=20, lr_scheduler=mx.lr_scheduler.PolyScheduler(
        max_update=10, base_lr=0.1)), "starts past its max_update"),
}


@pytest.mark.parametrize("name", sorted(NUMPY_SPECS))
def test_specs_that_map_run_in_numpy_like_mxnets_updater(name):
    """Every spec that maps runs in the numpy engine and ends bit for bit where MXNet's updater ends (whole
    keys and P3 slices, schedules through their decays and warmups, a resumed optimizer's counts)."""
    make = NUMPY_SPECS[name]
    updater = Updater(optimizer_to_spec(make()))
    assert updater.engine == "numpy", updater.engine_reason
    assert updater.optimizer is None
    init, grads = _init(), _grads(8)
    want = _reference(make, init, grads)
    stores = {(k, off): init[k][off:off + n].copy() for k, total in KEYS.items() for off, n in _slices(total)}
    order = [(k, off, n) for k, total in KEYS.items() for off, n in _slices(total)]
    for round_grads in grads:
        _sliced(updater, stores, round_grads, order)
    for k, total in KEYS.items():
        got = np.concatenate([stores[(k, off)] for off, _ in _slices(total)])
        np.testing.assert_array_equal(got, want[k], err_msg=f"{name}, key {k}")
    ref = make()
    begin = ref.begin_num_update
    counts, num_update = updater.update_counts()
    assert num_update == begin + 8 and set(counts.values()) == {begin + 8}


@pytest.mark.parametrize("name", sorted(MXNET_SPECS))
def test_specs_that_do_not_map_keep_mxnets_engine(name):
    make, reason = MXNET_SPECS[name]
    updater = Updater(optimizer_to_spec(make()))
    assert updater.engine == "mxnet" and reason in updater.engine_reason, updater.engine_reason
    with pytest.raises(GeoMXError, match="cannot run in numpy"):
        Updater(optimizer_to_spec(make()), engine="numpy")
    if name != "dcasgd":  # (DC-ASGD's own test is above: it needs a backup)
        init, grads = _init(), _grads(3)
        want = _reference(make, init, grads)
        stores = dict(init)
        for round_grads in grads:
            for k, g in round_grads.items():
                stores[k] = updater.apply(k, k, stores[k], g.copy())
        for k in KEYS:
            np.testing.assert_array_equal(stores[k], want[k], err_msg=f"{name}, key {k}")


@pytest.mark.parametrize("spec,reason", [
    ({"name": "adam", "params": {"learning_rate": 0.1}, "lr_mult": {"fc1_weight": 2.0}}, "other than key numbers"),
    ({"name": "adam", "params": {"learning_rate": 0.1}, "wd_mult": {"-5": 2.0}}, "other than key numbers"),
    ({"name": "adam", "params": {"learning_rate": 0.1, "beta1": 1.5}}, "beta1"),
    ({"name": "sgd", "params": {"learning_rate": 0.1, "nesterov": True}}, "nesterov have no numpy equivalent"),
    ({"name": "sgd", "params": {"learning_rate": 0.1}, "num_update": -1}, "not a count"),
    ({"name": "sgd", "params": {}, "lr_scheduler": {"class": "LRScheduler", "state": {"base_lr": 0.1}}},
     "has no numpy schedule"),
])
def test_neutral_spec_names_why_a_spec_does_not_map(spec, reason):
    got, why = neutral_spec(spec)
    assert got is None and reason in why, why


def _run(updater, stores, grads, order):
    for round_grads in grads:
        _sliced(updater, stores, round_grads, order)


@pytest.mark.parametrize("first,second", [("numpy", "numpy"), ("mxnet", "numpy"), ("numpy", "mxnet")])
@pytest.mark.parametrize("name", ["adam", "sgd-momentum", "rmsprop", "adagrad", "sgd-fp32"])
def test_checkpoint_round_trip_within_and_across_engines(name, first, second):
    """Counts and states through a checkpoint's encoding (JSON description + one byte buffer): a new
    updater continues bit for bit where an uninterrupted one ends, on the same engine and across them
    (both describe their states in MXNet's layout)."""
    make = OPTIMIZERS[name]
    init, grads = _init(), _grads(6)
    want = _reference(make, init, grads)
    spec = optimizer_to_spec(make())
    before = Updater(spec, engine=first)
    assert before.engine == first
    stores = {(k, off): init[k][off:off + n].copy() for k, total in KEYS.items() for off, n in _slices(total)}
    order = [(k, off, n) for k, total in KEYS.items() for off, n in _slices(total)]
    _run(before, stores, grads[:3], order)
    counts, num_update = before.update_counts()
    desc, blob = before.states_to_wire()
    desc = json.loads(json.dumps(desc))
    after = Updater(spec, engine=second)
    after.restore_counts(counts.items(), num_update)
    after.load_states(desc, blob.copy())
    assert after.update_counts() == (counts, num_update)
    stores = {key: value.copy() for key, value in stores.items()}
    _run(after, stores, grads[3:], order[::-1])
    for k, total in KEYS.items():
        got = np.concatenate([stores[(k, off)] for off, _ in _slices(total)])
        np.testing.assert_array_equal(got, want[k], err_msg=f"{name}, key {k}")
    if (first, second) == ("numpy", "numpy"):
        desc2, blob2 = after.states_to_wire()
        assert set(desc2["states"]) == set(desc["states"])


def test_numpy_engine_refuses_states_of_another_optimizer():
    adam = Updater(optimizer_to_spec(OPTIMIZERS["adam"]()))
    adam.apply(0, 0, np.zeros(4, np.float32), np.ones(4, np.float32))
    sgd = Updater(optimizer_to_spec(OPTIMIZERS["sgd-momentum"]()))
    with pytest.raises(GeoMXError, match="do not fit sgd"):
        sgd.load_states(*adam.states_to_wire())


def test_a_key_that_is_not_float32_moves_the_numpy_engine_to_mxnets():
    """The numpy rules are float32: a float16 key hands the counts and states so far to MXNet's updater,
    which then runs every key (as it did before the numpy engine), continuing exactly."""
    make = OPTIMIZERS["adam"]
    rng = np.random.RandomState(5)
    w32 = rng.standard_normal(64).astype(np.float32)
    w16 = rng.standard_normal(64).astype(np.float16)
    grads = [rng.standard_normal(64).astype(np.float32) for _ in range(4)]
    ref = mx.optimizer.get_updater(make())
    ref32, ref16 = mx.nd.array(w32), mx.nd.array(w16, dtype=np.float16)
    updater = Updater(optimizer_to_spec(make()))
    for t, g in enumerate(grads):
        w32 = updater.apply(0, 0, w32, g.copy())
        ref(0, mx.nd.array(g), ref32)
        if t >= 2:
            w16 = updater.apply(1, 1, w16, g.astype(np.float16))
            ref(1, mx.nd.array(g, dtype=np.float16), ref16)
        assert updater.engine == ("numpy" if t < 2 else "mxnet")
    np.testing.assert_array_equal(w32, ref32.asnumpy())
    np.testing.assert_array_equal(w16, ref16.asnumpy())
    assert updater.update_counts() == ({0: 4, 1: 2}, 4)


def test_adagrads_eps_reaches_the_server():
    """MXNet's AdaGrad keeps its eps as float_stable_eps: the spec still carries it, and the server's
    update (either engine) equals MXNet's own with that eps."""
    opt = mx.optimizer.AdaGrad(learning_rate=0.1, eps=1e-2)
    spec = optimizer_to_spec(opt)
    assert spec["params"]["eps"] == pytest.approx(1e-2)
    weight, grad = np.full(5, 0.5, np.float32), np.linspace(-1, 1, 5).astype(np.float32)
    want = mx.nd.array(weight)
    mx.optimizer.get_updater(mx.optimizer.AdaGrad(learning_rate=0.1, eps=1e-2))(0, mx.nd.array(grad), want)
    for engine in ("numpy", "mxnet"):
        got = Updater(json.loads(json.dumps(spec)), engine=engine).apply(0, 0, weight.copy(), grad)
        assert np.array_equal(got, want.asnumpy().reshape(-1)), engine
