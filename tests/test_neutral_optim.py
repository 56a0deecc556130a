"""The global server's framework-free optimizers (geomx.servers.optimizers) against the frameworks they
mirror: 100 steps on the same float32 weights and gradients as ``torch.optim`` (rule torch) and MXNet
1.9.1's ``mx.optimizer`` updater (rule mxnet), on a 1-element, a 2-D and a 1e5-element key, weight decay
on and off, one key with learning-rate and weight-decay multipliers. Also the spec's errors, checkpoints
(bit-exact continuation), P3 slices and learning-rate schedules."""
from __future__ import annotations

import ast
import functools
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

from geomx.errors import GeoMXError
from geomx.servers import optimizers
from geomx.servers.optimizers import NeutralUpdater, OptimizerSpecError, normalize_spec

pytestmark = pytest.mark.unit

SHAPES = {0: (1,), 1: (7, 13), 2: (100_000,)}
LR_MULT, WD_MULT = {1: 0.5}, {1: 2.0}  # key 1 runs at half the rate and twice the decay
STEPS = 100
TOLERANCE = 1e-6

LR = {"sgd": 0.05, "adam": 0.01, "adamw": 0.01, "rmsprop": 0.01, "adagrad": 0.1}

TORCH_CASES = [
    ("sgd", {}), ("sgd", {"momentum": 0.9}), ("sgd", {"momentum": 0.9, "dampening": 0.1}),
    ("sgd", {"momentum": 0.9, "nesterov": True, "maximize": True}),
    ("adam", {}), ("adam", {"amsgrad": True}), ("adam", {"betas": [0.8, 0.99], "eps": 1e-6}),
    ("adamw", {}), ("adamw", {"amsgrad": True}),
    ("rmsprop", {}), ("rmsprop", {"momentum": 0.9}), ("rmsprop", {"centered": True, "momentum": 0.5, "alpha": 0.9}),
    ("adagrad", {}), ("adagrad", {"lr_decay": 0.01, "initial_accumulator_value": 0.1, "eps": 1e-6}),
]
MXNET_CASES = [
    ("sgd", {}), ("sgd", {"rescale_grad": 0.5, "clip_gradient": 0.8}),
    ("sgd", {"momentum": 0.9, "rescale_grad": 0.5, "clip_gradient": 0.8}),
    ("adam", {}), ("adam", {"beta1": 0.8, "rescale_grad": 0.5, "clip_gradient": 0.6}),
    ("rmsprop", {}),
    ("rmsprop", {"centered": True, "gamma2": 0.8, "clip_weights": 2.5, "clip_gradient": 1.0}),
    ("adagrad", {}), ("adagrad", {"rescale_grad": 2.0, "clip_gradient": 1.5}),
]


@pytest.fixture(scope="module", autouse=True)
def _torch_on_one_thread():
    """torch splits a 1e5-element op over its threads; on a loaded machine every op then waits a
    scheduler tick for its second thread (12 ms per op, 40 s per case, measured). One thread."""
    try:
        import torch
    except ImportError:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _case_id(case):
    name, params = case
    return name + "".join(f"-{k}={v}" for k, v in params.items())


@functools.lru_cache(maxsize=None)
def _inputs(seed=0):
    """Initial weights and every step's gradients; shared by the tests (read only)."""
    rng = np.random.RandomState(seed)
    init = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    grads = [{k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(STEPS)]
    for arr in [*init.values(), *(g for r in grads for g in r.values())]:
        arr.flags.writeable = False
    return init, grads


def max_rel_err(got, want):
    """max|got - want| / max(1, max|want|): relative for weights of magnitude 1 and above, absolute below,
    so weights passing near zero cannot inflate it (the weights here start at N(0, 1))."""
    # In float32: the difference of two close float32 values is exact (Sterbenz), and where they are not
    # close its rounding is far below any tolerance here; no float64 copies of 1e5-element arrays.
    return float(np.max(np.abs(got - want))) / max(1.0, float(np.max(np.abs(want))))


def _spec(name, rule, params, wd_name, wd, **extra):
    return {"name": name, "rule": rule, "lr": LR[name], "params": {**params, wd_name: wd},
            "lr_mult": {str(k): v for k, v in LR_MULT.items()},
            "wd_mult": {str(k): v for k, v in WD_MULT.items()}, **extra}


def _run_neutral(spec, init, grads):
    """Yields the weights of every key after each step."""
    updater = NeutralUpdater(spec)
    stores = {k: v.copy() for k, v in init.items()}
    for round_grads in grads:
        for k, g in round_grads.items():
            stores[k] = updater.apply(k, k, stores[k], g).reshape(SHAPES[k])
        yield stores


def _torch_weights(name, params, wd, init, grads, schedule=None):
    torch = pytest.importorskip("torch")
    make = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
            "rmsprop": torch.optim.RMSprop, "adagrad": torch.optim.Adagrad}[name]
    tensors = {k: torch.tensor(v.copy()) for k, v in init.items()}
    groups = [{"params": [t], "lr": LR[name] * LR_MULT.get(k, 1.0), "weight_decay": wd * WD_MULT.get(k, 1.0)}
              for k, t in tensors.items()]
    opt = make(groups, foreach=False, **params)
    sched = schedule(opt) if schedule is not None else None
    for round_grads in grads:
        for k, t in tensors.items():
            t.grad = torch.tensor(round_grads[k].copy())
        opt.step()
        if sched is not None:
            sched.step()
        yield {k: t.detach().numpy() for k, t in tensors.items()}


def _mxnet_weights(name, params, wd, init, grads, scheduler=None):
    mx = pytest.importorskip("mxnet")
    opt = mx.optimizer.create(name, learning_rate=LR[name], wd=wd, lr_scheduler=scheduler, **params)
    opt.set_lr_mult(dict(LR_MULT))
    opt.set_wd_mult(dict(WD_MULT))
    updater = mx.optimizer.get_updater(opt)
    weights = {k: mx.nd.array(v) for k, v in init.items()}
    for round_grads in grads:
        for k, g in round_grads.items():
            updater(k, mx.nd.array(g), weights[k])
        yield {k: w.asnumpy() for k, w in weights.items()}


def _compare(ours, theirs):
    worst, steps = 0.0, 0
    for a, b in zip(ours, theirs):
        steps += 1
        for k in SHAPES:
            assert a[k].dtype == np.float32 and a[k].shape == b[k].shape
            worst = max(worst, max_rel_err(a[k], b[k]))
    assert steps == STEPS
    return worst


@pytest.mark.parametrize("wd", [0.0, 0.01], ids=["no-wd", "wd"])
@pytest.mark.parametrize("case", TORCH_CASES, ids=_case_id)
def test_torch_rule_follows_torch_optim(case, wd):
    name, params = case
    init, grads = _inputs()
    ours = _run_neutral(_spec(name, "torch", params, "weight_decay", wd), init, grads)
    err = _compare(ours, _torch_weights(name, params, wd, init, grads))
    print(f"torch {_case_id(case)} wd={wd}: max relative error {err:.2e}")
    assert err <= TOLERANCE


@pytest.mark.parametrize("wd", [0.0, 0.01], ids=["no-wd", "wd"])
@pytest.mark.parametrize("case", MXNET_CASES, ids=_case_id)
def test_mxnet_rule_follows_mxnet_updater(case, wd):
    name, params = case
    init, grads = _inputs()
    ours = _run_neutral(_spec(name, "mxnet", params, "wd", wd), init, grads)
    err = _compare(ours, _mxnet_weights(name, params, wd, init, grads))
    print(f"mxnet {_case_id(case)} wd={wd}: max relative error {err:.2e}")
    assert err <= TOLERANCE


def test_comparison_can_fail():
    """The measure sees a small change of one hyper-parameter, and the other framework's rule."""
    init, grads = _inputs()
    grads = grads[:20]
    spec = _spec("adam", "torch", {"betas": [0.9, 0.998]}, "weight_decay", 0.01)
    err = _compare_short(_run_neutral(spec, init, grads),
                         _torch_weights("adam", {"betas": [0.9, 0.999]}, 0.01, init, grads))
    assert err > 10 * TOLERANCE
    spec = _spec("rmsprop", "mxnet", {"gamma1": 0.99}, "wd", 0.0)  # torch's alpha, MXNet's eps placement
    err = _compare_short(_run_neutral(spec, init, grads),
                         _torch_weights("rmsprop", {"alpha": 0.99}, 0.0, init, grads))
    assert err > 10 * TOLERANCE


def _compare_short(ours, theirs):
    return max(max_rel_err(a[k], b[k]) for a, b in zip(ours, theirs) for k in SHAPES)


def test_torch_schedule_and_set_lr_follow_torch():
    """A StepLR stepped after every optimizer step, then the master worker setting a new rate."""
    torch = pytest.importorskip("torch")
    init, grads = _inputs()
    grads = grads[:30]
    spec = _spec("sgd", "torch", {"momentum": 0.9}, "weight_decay", 0.01,
                 schedule={"type": "step", "step": 7, "factor": 0.5})
    ours = list(_run_neutral(spec, init, grads))
    theirs = list(_torch_weights("sgd", {"momentum": 0.9}, 0.01, init, grads,
                                 schedule=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 7, 0.5)))
    assert _compare_short(ours, theirs) <= TOLERANCE

    updater = NeutralUpdater({"name": "adam", "lr": 0.01})
    tensor = torch.tensor(init[2].copy())
    opt = torch.optim.Adam([tensor], lr=0.01, foreach=False)
    store = init[2].copy()
    for t, round_grads in enumerate(grads):
        if t == 10:
            updater.set_lr(0.003)
            opt.param_groups[0]["lr"] = 0.003
        store = updater.apply(2, 2, store, round_grads[2])
        tensor.grad = torch.tensor(round_grads[2].copy())
        opt.step()
    assert max_rel_err(store, tensor.detach().numpy()) <= TOLERANCE


def test_mxnet_schedule_follows_mxnet_updater():
    mx = pytest.importorskip("mxnet")
    init, grads = _inputs()
    grads = grads[:40]
    spec = _spec("sgd", "mxnet", {"momentum": 0.9}, "wd", 0.01,
                 schedule={"type": "multistep", "milestones": [5, 12, 30], "factor": 0.3})
    sched = mx.lr_scheduler.MultiFactorScheduler(step=[5, 12, 30], factor=0.3, base_lr=LR["sgd"])
    ours = _run_neutral(spec, init, grads)
    theirs = _mxnet_weights("sgd", {"momentum": 0.9}, 0.01, init, grads, scheduler=sched)
    assert _compare_short(ours, theirs) <= TOLERANCE


# -- schedules on their own ----------------------------------------------------------------------------

MXNET_SCHEDULES = [
    ({"type": "step", "step": 4, "factor": 0.7}, "FactorScheduler", {"step": 4, "factor": 0.7, "stop_factor_lr": 0}),
    ({"type": "step", "step": 3, "factor": 0.5, "min_lr": 1e-3, "warmup_steps": 5, "warmup_begin_lr": 0.01},
     "FactorScheduler", {"step": 3, "factor": 0.5, "stop_factor_lr": 1e-3, "warmup_steps": 5,
                         "warmup_begin_lr": 0.01}),
    ({"type": "multistep", "milestones": [10, 25, 26], "factor": 0.1},
     "MultiFactorScheduler", {"step": [10, 25, 26], "factor": 0.1}),
    ({"type": "cosine", "max_update": 60, "final_lr": 0.001, "warmup_steps": 10, "warmup_mode": "constant",
      "warmup_begin_lr": 0.02}, "CosineScheduler",
     {"max_update": 60, "final_lr": 0.001, "warmup_steps": 10, "warmup_mode": "constant", "warmup_begin_lr": 0.02}),
    ({"type": "poly", "max_update": 70, "power": 3, "final_lr": 0.002, "warmup_steps": 4},
     "PolyScheduler", {"max_update": 70, "pwr": 3, "final_lr": 0.002, "warmup_steps": 4}),
]


@pytest.mark.parametrize("ours,cls,kwargs", MXNET_SCHEDULES, ids=[s[0]["type"] + str(i)
                                                                   for i, s in enumerate(MXNET_SCHEDULES)])
def test_mxnet_rule_schedules_are_mxnets(ours, cls, kwargs):
    mx = pytest.importorskip("mxnet")
    theirs = getattr(mx.lr_scheduler, cls)(base_lr=0.1, **kwargs)
    updater = NeutralUpdater({"name": "sgd", "rule": "mxnet", "lr": 0.1, "schedule": ours})
    for n in range(1, 101):  # MXNet's schedulers are stateful: asked in order, as its optimizer does
        assert math.isclose(updater.current_lr(n), theirs(n), rel_tol=1e-12, abs_tol=1e-15), n


def test_torch_rule_schedules_are_torchs():
    torch = pytest.importorskip("torch")
    lr_scheduler = torch.optim.lr_scheduler
    cases = [
        ({"type": "step", "step": 4, "factor": 0.7}, lambda o: lr_scheduler.StepLR(o, 4, 0.7)),
        ({"type": "multistep", "milestones": [10, 25, 26], "factor": 0.1},
         lambda o: lr_scheduler.MultiStepLR(o, [10, 25, 26], 0.1)),
        ({"type": "cosine", "max_update": 30, "final_lr": 0.001},
         lambda o: lr_scheduler.CosineAnnealingLR(o, 30, eta_min=0.001)),
        ({"type": "poly", "max_update": 40, "power": 2.0}, lambda o: lr_scheduler.PolynomialLR(o, 40, 2.0)),
    ]
    for ours, make in cases:
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        sched = make(opt)
        updater = NeutralUpdater({"name": "sgd", "lr": 0.1, "schedule": ours})
        for n in range(1, 101):  # the rate of the n-th update: the scheduler stepped after each of the others
            want = opt.param_groups[0]["lr"]
            assert math.isclose(updater.current_lr(n), want, rel_tol=1e-9, abs_tol=1e-12), (ours, n)
            opt.step()
            sched.step()


# -- checkpoints, slices, the spec -------------------------------------------------------------------------

ROUND_TRIP = [
    {"name": "sgd", "params": {"momentum": 0.9, "nesterov": True}},
    {"name": "adam", "params": {"amsgrad": True, "weight_decay": 0.01},
     "schedule": {"type": "cosine", "max_update": 80}},
    {"name": "adamw", "params": {}},
    {"name": "rmsprop", "params": {"centered": True, "momentum": 0.5}},
    {"name": "adagrad", "params": {"lr_decay": 0.01, "initial_accumulator_value": 0.1}},
    {"name": "sgd", "rule": "mxnet", "params": {"momentum": 0.9, "wd": 0.01},
     "schedule": {"type": "step", "step": 20, "factor": 0.5}},
    {"name": "adam", "rule": "mxnet", "params": {"wd": 0.01}},
    {"name": "rmsprop", "rule": "mxnet", "params": {"centered": True}},
    {"name": "adagrad", "rule": "mxnet", "params": {}},
]


@pytest.mark.parametrize("spec", ROUND_TRIP, ids=lambda s: f"{s['name']}-{s.get('rule', 'torch')}")
def test_state_dict_continues_exactly(spec):
    """50 steps, a checkpoint through JSON and an npz without pickles, a fresh updater, 50 more steps: the
    weights of 100 uninterrupted steps, bit for bit (P3 slice indices included)."""
    spec = {**spec, "lr": 0.01, "lr_mult": {"1": 0.5}}
    init, grads = _inputs()
    index = {0: 0, 1: 1, 2: -(1 + (2 << 35))}  # key 2 updated under a P3 slice's index
    want = {k: v.copy() for k, v in init.items()}
    straight = NeutralUpdater(spec)
    for round_grads in grads:
        for k, g in round_grads.items():
            want[k] = straight.apply(k, index[k], want[k], g)

    got = {k: v.copy() for k, v in init.items()}
    first = NeutralUpdater(spec)
    for round_grads in grads[:50]:
        for k, g in round_grads.items():
            got[k] = first.apply(k, index[k], got[k], g)
    saved = first.state_dict()
    meta = json.loads(json.dumps(saved["meta"]))
    buf = io.BytesIO()
    np.savez(buf, **saved["arrays"])
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    second = NeutralUpdater(spec)
    second.load_state_dict({"meta": meta, "arrays": arrays})
    assert second.update_counts() == first.update_counts()
    for round_grads in grads[50:]:
        for k, g in round_grads.items():
            got[k] = second.apply(k, index[k], got[k], g)
    for k in SHAPES:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"key {k}")


def test_load_state_dict_refuses_another_optimizer():
    adam = NeutralUpdater({"name": "adam"})
    adam.apply(0, 0, np.zeros(3, np.float32), np.ones(3, np.float32))
    with pytest.raises(OptimizerSpecError, match="cannot be loaded into sgd"):
        NeutralUpdater({"name": "sgd", "params": {"momentum": 0.9}}).load_state_dict(adam.state_dict())
    with pytest.raises(OptimizerSpecError, match="amsgrad|keeps"):
        NeutralUpdater({"name": "adam", "params": {"amsgrad": True}}).load_state_dict(adam.state_dict())
    with pytest.raises(OptimizerSpecError, match="malformed"):
        NeutralUpdater({"name": "adam"}).load_state_dict({"meta": {"format": 1}, "arrays": {}})


@pytest.mark.parametrize("spec", [
    {"name": "adam", "params": {"weight_decay": 0.01}},
    {"name": "sgd", "rule": "mxnet", "params": {"momentum": 0.9, "wd": 0.01}},
    {"name": "rmsprop", "rule": "mxnet", "params": {"centered": True, "wd": 0.01}},
], ids=["adam-torch", "sgd-mxnet", "rmsprop-mxnet"])
def test_p3_slices_inherit_the_keys_multipliers(spec):
    """A key cut in slices, each under its own index, ends where the whole key ends: the slices take the
    key's lr and wd multipliers and keep their own states and counts (the rules are element-wise)."""
    spec = {**spec, "lr": 0.01, "lr_mult": {"5": 0.3}, "wd_mult": {"5": 4.0}}
    rng = np.random.RandomState(4)
    init = rng.standard_normal(1000).astype(np.float32)
    grads = [rng.standard_normal(1000).astype(np.float32) for _ in range(10)]
    whole, sliced = NeutralUpdater(spec), NeutralUpdater(spec)
    plain = NeutralUpdater({**spec, "lr_mult": {}, "wd_mult": {}})
    w, p = init.copy(), init.copy()
    parts = {off: init[off:off + 400].copy() for off in range(0, 1000, 400)}
    for g in grads:
        w = whole.apply(5, 5, w, g)
        p = plain.apply(5, 5, p, g)
        for off in sorted(parts, reverse=True):  # slices arrive in any order
            parts[off] = sliced.apply(5, -(1 + (5 << 35) + off), parts[off], g[off:off + 400])
    np.testing.assert_array_equal(np.concatenate([parts[o] for o in sorted(parts)]), w)
    assert max_rel_err(p, w) > 1e-3  # the multipliers did change the result
    counts, num_update = sliced.update_counts()
    assert sorted(counts.values()) == [10, 10, 10] and num_update == 10 and 5 not in counts


def test_apply_does_not_write_its_inputs():
    updater = NeutralUpdater({"name": "sgd", "rule": "mxnet", "params": {"momentum": 0.9, "wd": 0.1,
                                                                         "clip_gradient": 0.5}})
    store, grad = np.arange(6, dtype=np.float32), np.full(6, 2.0, np.float32)
    before = (store.copy(), grad.copy())
    out = updater.apply(0, 0, store, grad)
    assert out is not store and out.shape == (6,)
    np.testing.assert_array_equal(store, before[0])
    np.testing.assert_array_equal(grad, before[1])
    with pytest.raises(GeoMXError, match="states of 6 elements"):
        updater.apply(0, 0, np.zeros(4, np.float32), np.zeros(4, np.float32))
    with pytest.raises(GeoMXError, match="gradient of 3 elements"):
        updater.apply(1, 1, np.zeros(4, np.float32), np.zeros(3, np.float32))


def test_unknown_optimizer_names_the_supported_ones_and_local_mode():
    with pytest.raises(OptimizerSpecError) as info:
        NeutralUpdater({"name": "lamb", "lr": 0.1})
    message = str(info.value)
    assert "'lamb'" in message and 'mode="local"' in message
    for name in ("sgd", "adam", "adamw", "rmsprop", "adagrad"):
        assert name in message
    assert isinstance(info.value, GeoMXError)


@pytest.mark.parametrize("spec,match", [
    ({"name": "adam", "params": {"beta1": 0.9}}, "no hyper-parameter 'beta1'.*betas"),
    ({"name": "adam", "rule": "mxnet", "params": {"betas": [0.9, 0.99]}}, "no hyper-parameter 'betas'.*beta1"),
    ({"name": "sgd", "params": {"momentum": 0.9, "nesterov": True, "dampening": 0.1}}, "nesterov"),
    ({"name": "sgd", "params": {"nesterov": True}}, "nesterov"),
    ({"name": "adamw", "rule": "mxnet"}, "adamw has no mxnet rule"),
    ({"name": "adam", "rule": "tf"}, "unknown rule 'tf'"),
    ({"name": "adam", "lr": -1}, "lr = -1 is out of range"),
    ({"name": "adam", "lr": "fast"}, "lr must be a number"),
    ({"name": "adam", "params": {"betas": [0.9, 1.5]}}, r"betas\[1\]"),
    ({"name": "sgd", "params": {"momentum": True}}, "momentum must be a number"),
    ({"name": "rmsprop", "params": {"centered": 1}}, "centered must be true or false"),
    ({"name": "sgd", "rule": "mxnet", "params": {"clip_gradient": -1.0}}, "clip_gradient"),
    ({"name": "sgd", "lr_mult": {"w0": 2.0}}, "lr_mult has key 'w0'"),
    ({"name": "sgd", "wd_mult": {"1": -2.0}}, "out of range"),
    ({"name": "sgd", "momentum": 0.9}, "unknown field.*'momentum'"),
    ({"name": "sgd", "schedule": {"type": "exponential"}}, "unknown learning-rate schedule 'exponential'"),
    ({"name": "sgd", "schedule": {"type": "step", "step": 3, "gamma": 0.5}}, "no parameter 'gamma'"),
    ({"name": "sgd", "schedule": {"type": "multistep", "milestones": [5, 3]}}, "milestones must increase"),
    ({"name": "sgd", "schedule": {"type": "poly", "max_update": 10, "final_lr": 0.1}}, "PolynomialLR"),
    ({"name": "sgd", "schedule": {"type": "cosine", "max_update": 10, "warmup_steps": 10}}, "warmup_steps"),
    ("adam", "is a dict"),
])
def test_spec_errors_name_the_problem(spec, match):
    with pytest.raises(OptimizerSpecError, match=match):
        normalize_spec(spec)


def test_spec_is_json_and_complete():
    spec = normalize_spec({"name": "adamw", "params": {"betas": (0.8, 0.9), "foreach": False}})
    assert json.loads(json.dumps(spec)) == spec
    assert spec["rule"] == "torch" and spec["lr"] == 1e-3 and spec["params"]["weight_decay"] == 1e-2
    assert spec["params"]["betas"] == [0.8, 0.9] and spec["schedule"] is None
    assert normalize_spec(spec) == spec
    mx_spec = normalize_spec({"name": "rmsprop", "rule": "mxnet", "lr_mult": {3: 2}})
    assert mx_spec["params"]["gamma1"] == 0.9 and mx_spec["params"]["epsilon"] == 1e-8
    assert mx_spec["lr_mult"] == {"3": 2.0}


def test_module_imports_no_framework():
    """The servers' optimizer must run where neither MXNet nor PyTorch is installed."""
    tree = ast.parse(Path(optimizers.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "copy", "math", "typing", "numpy"}, imported
