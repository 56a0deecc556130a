"""Server-side optimizers in numpy, built from a framework-neutral spec: no MXNet, no PyTorch.

A global server that runs the optimizer (FSA, MixedSync, ...) applies it per key with a
:class:`NeutralUpdater`. The optimizer arrives as a plain JSON-safe dict::

    {
      "name": "sgd" | "adam" | "adamw" | "rmsprop" | "adagrad",
      "rule": "torch" | "mxnet",        # optional, default "torch"
      "lr": 0.01,                        # optional, default: the framework's default for it
      "params": {...},                   # hyper-parameters, named as the rule's framework names them
      "lr_mult": {"3": 0.5},             # optional, per key (JSON keys are strings of ints)
      "wd_mult": {"3": 0.0},             # optional, per key
      "schedule": {"type": "step", ...}  # optional, see below
    }

``rule`` says whose update rule (and whose hyper-parameter names) the spec follows, so that a worker
built on either framework keeps its optimizer's exact semantics on the server:

* ``"torch"``: ``torch.optim``'s single-tensor update (``foreach=False``), hyper-parameters as its
  constructors name them. ``sgd``: momentum, dampening, nesterov, weight_decay, maximize. ``adam``:
  betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay. ``adamw``: the same, the decay
  decoupled (``torch.optim.AdamW``). ``rmsprop``: alpha, eps, weight_decay, momentum, centered,
  maximize. ``adagrad``: lr_decay, weight_decay, initial_accumulator_value, eps, maximize. torch's
  execution switches (foreach, fused, capturable, differentiable) are accepted and ignored: they do
  not change the rule.
* ``"mxnet"``: MXNet 1.9.1's ``mx.optimizer`` (as its Updater runs it on dense float32 weights),
  hyper-parameters as its constructors name them, each with ``wd``, ``rescale_grad`` and
  ``clip_gradient``. ``sgd``: momentum (weight decay and clipping inside the momentum, as
  ``sgd_mom_update``). ``adam``: beta1, beta2, epsilon (bias correction folded into the step's
  learning rate). ``rmsprop``: gamma1, gamma2, epsilon (inside the square root), centered
  (Graves' variant, momentum gamma2), clip_weights. ``adagrad``: eps (inside the square root).
  ``lazy_update`` and ``multi_precision`` are accepted and ignored (sparse and float16 only).
  MXNet 1.9.1 registers no AdamW, so ``adamw`` has no mxnet rule.

Weight decay is ``weight_decay`` (torch) or ``wd`` (mxnet), times the key's ``wd_mult``; the learning
rate is the (scheduled) base rate times the key's ``lr_mult``. A P3 slice, updated under an index of
its own, takes its key's multipliers unless the spec names the index itself.

Schedules scale the base learning rate by the number of updates (``num_update``: the highest update
count of any index, so one round of keys counts once, as in MXNet). The rule sets the clock: mxnet
evaluates MXNet's schedulers at ``num_update`` (this update's number), torch evaluates torch's
schedulers at ``num_update - 1`` (the updates already made: a scheduler stepped after every
``optimizer.step()``). Types:

* ``{"type": "step", "step": s, "factor": f, "min_lr": 0}``: ``FactorScheduler`` / ``StepLR``; the
  two agree. ``min_lr`` is MXNet's ``stop_factor_lr`` (which MXNet defaults to 1e-8; 0 here).
* ``{"type": "multistep", "milestones": [..], "factor": f}``: ``MultiFactorScheduler`` / ``MultiStepLR``.
* ``{"type": "cosine", "max_update": T, "final_lr": 0}``: ``CosineScheduler`` (held at final_lr
  after T) / ``CosineAnnealingLR`` (T_max=T, eta_min=final_lr; periodic after T, as torch's is).
* ``{"type": "poly", "max_update": T, "power": p, "final_lr": 0}``: ``PolyScheduler`` (power
  default 2) / ``PolynomialLR`` (total_iters=T, power default 1, final_lr 0 only).
* every type takes MXNet's warmup: ``warmup_steps``, ``warmup_begin_lr``, ``warmup_mode``
  (``linear`` or ``constant``), on the rule's clock.

:meth:`NeutralUpdater.set_lr` replaces the base rate (the master worker running its own schedule).
The arithmetic is float32, as the frameworks' CPU kernels; their fused multiply-adds and operation
order can differ from numpy's in the last bits, so results agree to about 1e-7 relative per step, not
bit for bit. States are per index, float32, and checkpoint as JSON-safe metadata plus named arrays
(:meth:`NeutralUpdater.state_dict`), never a pickle.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np

from ..errors import GeoMXError

SUPPORTED = ("sgd", "adam", "adamw", "rmsprop", "adagrad")
RULES = ("torch", "mxnet")
SCHEDULES = ("step", "multistep", "cosine", "poly")
STATE_FORMAT = 1

_F32 = np.float32
_TORCH_SWITCHES = {"foreach": None, "fused": None, "capturable": False, "differentiable": False}
_MXNET_SWITCHES = {"lazy_update": True, "multi_precision": False}
_MXNET_COMMON = {"wd": 0.0, "rescale_grad": 1.0, "clip_gradient": None}

# Every (name, rule): its default base learning rate and hyper-parameters, as the framework defaults them.
_DEFAULTS: Dict[Tuple[str, str], Tuple[float, Dict[str, Any]]] = {
    ("sgd", "torch"): (1e-3, {"momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0,
                              "maximize": False, **_TORCH_SWITCHES}),
    ("adam", "torch"): (1e-3, {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False,
                               "maximize": False, "decoupled_weight_decay": False, **_TORCH_SWITCHES}),
    ("adamw", "torch"): (1e-3, {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 1e-2, "amsgrad": False,
                                "maximize": False, **_TORCH_SWITCHES}),
    ("rmsprop", "torch"): (1e-2, {"alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.0,
                                  "centered": False, "maximize": False, **_TORCH_SWITCHES}),
    ("adagrad", "torch"): (1e-2, {"lr_decay": 0.0, "weight_decay": 0.0, "initial_accumulator_value": 0.0,
                                  "eps": 1e-10, "maximize": False, **_TORCH_SWITCHES}),
    ("sgd", "mxnet"): (0.01, {"momentum": 0.0, **_MXNET_COMMON, **_MXNET_SWITCHES}),
    ("adam", "mxnet"): (0.001, {"beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8, **_MXNET_COMMON,
                                **_MXNET_SWITCHES}),
    ("rmsprop", "mxnet"): (0.001, {"gamma1": 0.9, "gamma2": 0.9, "epsilon": 1e-8, "centered": False,
                                   "clip_weights": None, **_MXNET_COMMON, **_MXNET_SWITCHES}),
    ("adagrad", "mxnet"): (0.01, {"eps": 1e-7, **_MXNET_COMMON, **_MXNET_SWITCHES}),
}

_SCHEDULE_KEYS = {
    "step": {"step", "factor", "min_lr"},
    "multistep": {"milestones", "factor"},
    "cosine": {"max_update", "final_lr"},
    "poly": {"max_update", "power", "final_lr"},
}
_WARMUP_KEYS = {"warmup_steps", "warmup_begin_lr", "warmup_mode"}


class OptimizerSpecError(GeoMXError):
    """An optimizer spec the global server cannot run (the message names the field and the choices)."""


# -- the spec -------------------------------------------------------------------------------------------

def _number(value: Any, what: str, *, low: Optional[float] = None, integer: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise OptimizerSpecError(f"{what} must be {'an integer' if integer else 'a number'}, not {value!r}")
    if not math.isfinite(value) or (low is not None and value < low):
        raise OptimizerSpecError(f"{what} = {value!r} is out of range" + (f" (at least {low})" if low is not None
                                                                          else ""))
    return value if integer else float(value)


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise OptimizerSpecError(f"{what} must be true or false, not {value!r}")
    return value


def _multipliers(table: Any, what: str) -> Dict[int, float]:
    if table is None:
        return {}
    if not isinstance(table, Mapping):
        raise OptimizerSpecError(f"{what} must map keys to numbers, not {table!r}")
    out: Dict[int, float] = {}
    for k, v in table.items():
        try:
            index = int(k)
        except (TypeError, ValueError):
            raise OptimizerSpecError(f"{what} has key {k!r}: keys are integers (as strings in JSON)") from None
        out[index] = _number(v, f"{what}[{k!r}]", low=0.0)
    return out


def _check_params(name: str, rule: str, params: Dict[str, Any]) -> None:
    """Ranges and combinations the frameworks themselves refuse, and the types every rule reads."""
    what = f"{name} ({rule} rule)"
    for pname, value in params.items():
        if pname in _TORCH_SWITCHES or pname in _MXNET_SWITCHES:
            continue
        if pname in ("nesterov", "amsgrad", "maximize", "centered", "decoupled_weight_decay"):
            _flag(value, f"{what}: {pname}")
        elif pname == "betas":
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                raise OptimizerSpecError(f"{what}: betas must be two numbers, not {value!r}")
            for i, beta in enumerate(value):
                if not 0.0 <= _number(beta, f"{what}: betas[{i}]") < 1.0:
                    raise OptimizerSpecError(f"{what}: betas[{i}] = {beta!r} must be in [0, 1)")
        elif pname in ("clip_gradient", "clip_weights"):
            if value is not None:
                _number(value, f"{what}: {pname}", low=0.0)  # None turns it off
        elif pname in ("beta1", "beta2", "alpha", "gamma1", "gamma2", "dampening"):
            if not 0.0 <= _number(value, f"{what}: {pname}") <= 1.0:
                raise OptimizerSpecError(f"{what}: {pname} = {value!r} must be in [0, 1]")
        elif pname == "rescale_grad":
            _number(value, f"{what}: {pname}")
        else:  # momentum, eps, epsilon, weight_decay, wd, lr_decay, initial_accumulator_value
            _number(value, f"{what}: {pname}", low=0.0)
    if name == "sgd" and rule == "torch" and params["nesterov"] and (params["momentum"] <= 0
                                                                      or params["dampening"] != 0):
        raise OptimizerSpecError("sgd (torch rule): nesterov needs momentum > 0 and dampening 0")


def _check_schedule(schedule: Any, rule: str) -> Optional[Dict[str, Any]]:
    if schedule is None:
        return None
    if not isinstance(schedule, Mapping) or "type" not in schedule:
        raise OptimizerSpecError(f"schedule must be a dict with a 'type' (one of {', '.join(SCHEDULES)}), "
                                 f"not {schedule!r}")
    kind = schedule["type"]
    if kind not in _SCHEDULE_KEYS:
        raise OptimizerSpecError(f"unknown learning-rate schedule {kind!r}; supported: {', '.join(SCHEDULES)} "
                                 "(or none, the master worker setting the rate with set_lr)")
    allowed = _SCHEDULE_KEYS[kind] | _WARMUP_KEYS
    unknown = sorted(set(schedule) - allowed - {"type"})
    if unknown:
        raise OptimizerSpecError(f"schedule {kind!r} has no parameter {', '.join(map(repr, unknown))}; "
                                 f"it takes: {', '.join(sorted(allowed))}")
    out: Dict[str, Any] = {"type": kind, "warmup_steps": 0, "warmup_begin_lr": 0.0, "warmup_mode": "linear"}
    if kind == "step":
        out["step"] = _number(schedule.get("step"), "schedule step", low=1, integer=True)
        out["factor"] = _number(schedule.get("factor", 1.0), "schedule factor", low=0.0)
        out["min_lr"] = _number(schedule.get("min_lr", 0.0), "schedule min_lr", low=0.0)
    elif kind == "multistep":
        milestones = schedule.get("milestones")
        if not isinstance(milestones, (list, tuple)) or not milestones:
            raise OptimizerSpecError(f"schedule multistep needs milestones, a list of increasing integers, "
                                     f"not {milestones!r}")
        steps = [_number(m, "schedule milestone", low=1, integer=True) for m in milestones]
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise OptimizerSpecError(f"schedule milestones must increase: {steps}")
        out["milestones"] = steps
        out["factor"] = _number(schedule.get("factor", 1.0), "schedule factor", low=0.0)
    else:
        out["max_update"] = _number(schedule.get("max_update"), "schedule max_update", low=1, integer=True)
        out["final_lr"] = _number(schedule.get("final_lr", 0.0), "schedule final_lr", low=0.0)
        if kind == "poly":
            out["power"] = _number(schedule.get("power", 2.0 if rule == "mxnet" else 1.0), "schedule power")
            if rule == "torch" and out["final_lr"] != 0.0:
                raise OptimizerSpecError("schedule poly: torch's PolynomialLR decays to 0 (final_lr 0); "
                                         "use rule mxnet for a final_lr")
    out["warmup_steps"] = _number(schedule.get("warmup_steps", 0), "schedule warmup_steps", low=0, integer=True)
    out["warmup_begin_lr"] = _number(schedule.get("warmup_begin_lr", 0.0), "schedule warmup_begin_lr", low=0.0)
    mode = schedule.get("warmup_mode", "linear")
    if mode not in ("linear", "constant"):
        raise OptimizerSpecError(f"schedule warmup_mode {mode!r}: linear or constant")
    out["warmup_mode"] = mode
    if kind in ("cosine", "poly") and out["warmup_steps"] >= out["max_update"]:
        raise OptimizerSpecError("schedule warmup_steps must be below max_update")
    return out


def normalize_spec(spec: Any) -> Dict[str, Any]:
    """``spec`` validated and completed with every default: what a :class:`NeutralUpdater` runs.

    Raises :class:`OptimizerSpecError` naming what is wrong: an unknown optimizer (with the supported
    ones, and ``mode="local"`` as the way to run any other), rule, hyper-parameter or schedule.
    """
    if not isinstance(spec, Mapping):
        raise OptimizerSpecError(f"an optimizer spec is a dict, not {type(spec).__name__}")
    unknown_fields = sorted(set(spec) - {"name", "rule", "lr", "params", "lr_mult", "wd_mult", "schedule"})
    if unknown_fields:
        raise OptimizerSpecError(f"optimizer spec has unknown field(s) {', '.join(map(repr, unknown_fields))}; "
                                 "it takes: name, rule, lr, params, lr_mult, wd_mult, schedule")
    name = spec.get("name")
    if name not in SUPPORTED:
        raise OptimizerSpecError(
            f"unknown optimizer {name!r} for the global server; it runs: {', '.join(SUPPORTED)}. "
            'For any other optimizer use mode="local": each worker steps its own optimizer and the '
            "servers only aggregate")
    rule = spec.get("rule", "torch")
    if rule not in RULES:
        raise OptimizerSpecError(f"unknown rule {rule!r} for {name}; rules: {', '.join(RULES)}")
    if (name, rule) not in _DEFAULTS:
        raise OptimizerSpecError(f"{name} has no {rule} rule (MXNet 1.9.1's mx.optimizer has no {name}); "
                                 f"use rule 'torch', or mode=\"local\"")
    default_lr, defaults = _DEFAULTS[(name, rule)]
    params = spec.get("params") or {}
    if not isinstance(params, Mapping):
        raise OptimizerSpecError(f"{name} params must be a dict, not {params!r}")
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise OptimizerSpecError(f"{name} ({rule} rule) has no hyper-parameter {', '.join(map(repr, unknown))}; "
                                 f"it takes: {', '.join(sorted(defaults))}")
    merged = {**defaults, **params}
    if isinstance(merged.get("betas"), tuple):
        merged["betas"] = list(merged["betas"])
    _check_params(name, rule, merged)
    lr = _number(spec.get("lr", default_lr), f"{name} lr", low=0.0)
    return {"name": name, "rule": rule, "lr": lr, "params": merged,
            "lr_mult": {str(k): v for k, v in _multipliers(spec.get("lr_mult"), "lr_mult").items()},
            "wd_mult": {str(k): v for k, v in _multipliers(spec.get("wd_mult"), "wd_mult").items()},
            "schedule": _check_schedule(spec.get("schedule"), rule)}


# -- schedules ------------------------------------------------------------------------------------------

class _Schedule:
    """The base rate at ``num_update`` under one schedule; the rule picks the clock (module docstring).

    Step decays are products of the factor (repeated multiplication, as both frameworks' schedulers
    do it, so the rates agree in every bit of the float64 they hand to float32), kept for the last
    count asked so that a step per update costs no loop over all the decays before it.
    """

    def __init__(self, desc: Dict[str, Any], rule: str):
        self.desc = desc
        self.rule = rule
        self._last: Tuple[float, int, float] = (math.nan, 0, math.nan)  # (base, decays, rate)

    def _decayed(self, base: float, decays: int) -> float:
        last_base, last_decays, rate = self._last
        if last_base != base or decays < last_decays:
            last_decays, rate = 0, base
        factor, floor = self.desc["factor"], self.desc.get("min_lr", 0.0)
        for _ in range(decays - last_decays):
            rate = max(rate * factor, floor)
        self._last = (base, decays, rate)
        return rate

    def __call__(self, base: float, num_update: int) -> float:
        d = self.desc
        n = max(num_update if self.rule == "mxnet" else num_update - 1, 0)
        warmup = d["warmup_steps"]
        if n < warmup:
            if d["warmup_mode"] == "constant":
                return d["warmup_begin_lr"]
            return d["warmup_begin_lr"] + (base - d["warmup_begin_lr"]) * float(n) / float(warmup)
        kind = d["type"]
        if kind == "step":
            # MXNet decays once num_update passes each multiple of step, torch at each multiple of its count
            decays = (n - 1) // d["step"] if self.rule == "mxnet" else n // d["step"]
            return self._decayed(base, max(decays, 0))
        if kind == "multistep":
            passed = sum(1 for m in d["milestones"] if (n > m if self.rule == "mxnet" else n >= m))
            return self._decayed(base, passed)
        final, top = d["final_lr"], d["max_update"]
        if kind == "cosine":
            if self.rule == "mxnet":
                n = min(n, top)  # MXNet holds final_lr after max_update; torch's cosine goes on, periodic
            return final + (base - final) * (1 + math.cos(math.pi * (n - warmup) / (top - warmup))) / 2
        if self.rule == "mxnet":
            n = min(n, top)
            return final + (base - final) * math.pow(1 - float(n - warmup) / float(top - warmup), d["power"])
        left = 1.0 - min(top - warmup, n - warmup) / (top - warmup)
        return base * left ** d["power"]


# -- the update rules: (weight, grad, states, hyper-parameters, lr, wd, count), in place on weight and states

_StepFn = Callable[[np.ndarray, np.ndarray, Dict[str, np.ndarray], Dict[str, Any], float, float, int], None]


def _torch_grad(weight: np.ndarray, grad: np.ndarray, p: Dict[str, Any], wd: float) -> np.ndarray:
    """The gradient torch's rules read: negated to maximize, plus coupled L2 decay (``grad + wd*w``)."""
    g = np.negative(grad) if p["maximize"] else grad
    if wd != 0:
        g = g + weight * _F32(wd)
    return g


def _lerp_into(start: np.ndarray, end: np.ndarray, weight: float) -> None:
    """``start += weight * (end - start)`` in float32, with torch's two branches for precision."""
    w = _F32(weight)
    diff = end - start
    if abs(weight) < 0.5:
        diff *= w
        start += diff
    else:
        diff *= _F32(1 - weight)
        np.subtract(end, diff, out=start)


def _sgd_torch(w: np.ndarray, grad: np.ndarray, st: Dict[str, np.ndarray], p: Dict[str, Any], lr: float, wd: float,
               count: int) -> None:
    g = _torch_grad(w, grad, p, wd)
    momentum = p["momentum"]
    if momentum != 0:
        buf = st["momentum_buffer"]
        if count == 1:  # torch starts the buffer at the first gradient, undamped
            buf[...] = g
        else:
            buf *= _F32(momentum)
            buf += g * _F32(1 - p["dampening"])
        g = g + buf * _F32(momentum) if p["nesterov"] else buf
    w += g * _F32(-lr)


def _adam_torch(w: np.ndarray, grad: np.ndarray, st: Dict[str, np.ndarray], p: Dict[str, Any], lr: float, wd: float,
                count: int, decoupled: bool = False) -> None:
    g = np.negative(grad) if p["maximize"] else grad
    if wd != 0:
        if decoupled or p.get("decoupled_weight_decay"):
            w *= _F32(1 - lr * wd)
        else:
            g = g + w * _F32(wd)
    beta1, beta2 = p["betas"]
    m, v = st["exp_avg"], st["exp_avg_sq"]
    _lerp_into(m, g, 1 - beta1)
    v *= _F32(beta2)
    v += (g * _F32(1 - beta2)) * g
    correction1 = 1 - beta1 ** count
    correction2_sqrt = (1 - beta2 ** count) ** 0.5
    if p["amsgrad"]:
        np.maximum(st["max_exp_avg_sq"], v, out=st["max_exp_avg_sq"])
        v = st["max_exp_avg_sq"]
    denom = np.sqrt(v)
    denom /= _F32(correction2_sqrt)
    denom += _F32(p["eps"])
    step = m / denom
    step *= _F32(-(lr / correction1))
    w += step


def _adamw_torch(w: np.ndarray, grad: np.ndarray, st: Dict[str, np.ndarray], p: Dict[str, Any], lr: float, wd: float,
                 count: int) -> None:
    _adam_torch(w, grad, st, p, lr, wd, count, decoupled=True)


def _rmsprop_torch(w: np.ndarray, grad: np.ndarray, st: Dict[str, np.ndarray], p: Dict[str, Any], lr: float, wd: float,
                   count: int) -> None:
    g = _torch_grad(w, grad, p, wd)
    alpha = p["alpha"]
    sq = st["square_avg"]
    sq *= _F32(alpha)
    sq += (g * _F32(1 - alpha)) * g
    if p["centered"]:
        ga = st["grad_avg"]
        _lerp_into(ga, g, 1 - alpha)
        avg = np.sqrt(sq - ga * ga)
    else:
        avg = np.sqrt(sq)
    avg += _F32(p["eps"])
    if p["momentum"] > 0:
        buf = st["momentum_buffer"]
        buf *= _F32(p["momentum"])
        buf += g / avg
        w += buf * _F32(-lr)
    else:
        w += (g / avg) * _F32(-lr)


def _adagrad_torch(w: np.ndarray, grad: np.ndarray, st: Dict[str, np.ndarray], p: Dict[str, Any], lr: float, wd: float,
                   count: int) -> None:
    g = _torch_grad(w, grad, p, wd)
    decayed_lr = lr / (1 + (count - 1) * p["lr_decay"])
    total = st["sum"]
    total += g * g
    std = np.sqrt(total)
    std += _F32(p["eps"])
    w += (g / std) * _F32(-decayed_lr)


def _mxnet_grad(grad: np.ndarray, p: Dict[str, Any]) -> np.ndarray:
    return grad * _F32(p["rescale_grad"])


def _mxnet_clip(g: np.ndarray, p: Dict[str, Any]) -> np.ndarray:
    # mx.optimizer passes clip_gradient to its kernels only when truthy: 0 and None both mean no clipping
    if p["clip_gradient"]:
        bound = _F32(p["clip_gradient"])
        np.clip(g, -bound, bound, out=g)
    return g


def _sgd_mxnet(w: np.ndarray, grad: np.ndarray, st: Dict[str, np.ndarray], p: Dict[str, Any], lr: float, wd: float,
               count: int) -> None:
    # multi_sgd(_mom)_update: mom = momentum*mom - lr*wd*w - lr*clip(rescale*g), then w + mom; the
    # decay is scaled by lr next to the gradient (torch adds it to the gradient before the momentum)
    if p["clip_gradient"]:
        step = _mxnet_clip(_mxnet_grad(grad, p), p)
        step *= _F32(lr)
    else:
        step = grad * (_F32(lr) * _F32(p["rescale_grad"]))
    if wd == 0 and not p["momentum"] > 0:
        # plain SGD without decay: w + (-0 - step) is w - step for finite weights; two passes less
        w -= step
        return
    decay = w * (_F32(lr) * _F32(wd))
    if p["momentum"] > 0:
        mom = st["momentum"]
        mom *= _F32(p["momentum"])
        mom -= decay
        mom -= step
        w += mom
    else:
        np.negative(decay, out=decay)
        decay -= step
        w += decay


def _adam_mxnet(w: np.ndarray, grad: np.ndarray, st: Dict[str, np.ndarray], p: Dict[str, Any], lr: float, wd: float,
                count: int) -> None:
    # mx.optimizer.Adam folds both bias corrections into the step's rate, outside the kernel (float64)
    lr_t = lr * math.sqrt(1.0 - p["beta2"] ** count) / (1.0 - p["beta1"] ** count)
    g = _mxnet_grad(grad, p)
    g += w * _F32(wd)  # MXNet's decay enters the moments, before clipping
    _mxnet_clip(g, p)
    m, v = st["mean"], st["var"]
    beta1, beta2 = _F32(p["beta1"]), _F32(p["beta2"])
    m *= beta1
    m += (_F32(1) - beta1) * g
    v *= beta2
    v += ((_F32(1) - beta2) * g) * g
    denom = np.sqrt(v)
    denom += _F32(p["epsilon"])
    step = m * _F32(lr_t)
    step /= denom
    w -= step


def _rmsprop_mxnet(w: np.ndarray, grad: np.ndarray, st: Dict[str, np.ndarray], p: Dict[str, Any], lr: float, wd: float,
                   count: int) -> None:
    g = _mxnet_grad(grad, p)
    g += w * _F32(wd)
    _mxnet_clip(g, p)
    gamma1 = _F32(p["gamma1"])
    n = st["n"]
    n *= gamma1
    if p["centered"]:  # rmspropalex_update: Graves' variant with momentum gamma2 on the step
        n += ((_F32(1) - gamma1) * g) * g
        mean, delta = st["g"], st["delta"]
        mean *= gamma1
        mean += (_F32(1) - gamma1) * g
        denom = n - mean * mean
        denom += _F32(p["epsilon"])  # MXNet puts epsilon inside the square root
        np.sqrt(denom, out=denom)
        delta *= _F32(p["gamma2"])
        delta -= (g * _F32(lr)) / denom
        w += delta
    else:
        n += (_F32(1) - gamma1) * (g * g)
        denom = n + _F32(p["epsilon"])
        np.sqrt(denom, out=denom)
        w -= (g / denom) * _F32(lr)
    if p["clip_weights"]:
        bound = _F32(p["clip_weights"])
        np.clip(w, -bound, bound, out=w)


def _adagrad_mxnet(w: np.ndarray, grad: np.ndarray, st: Dict[str, np.ndarray], p: Dict[str, Any], lr: float, wd: float,
                   count: int) -> None:
    g = _mxnet_grad(grad, p)
    if p["clip_gradient"] is not None:  # AdaGrad (not its kernel) tests for None: 0 clips to zero
        bound = _F32(p["clip_gradient"])
        np.clip(g, -bound, bound, out=g)
    history = st["history"]
    history += g * g
    div = history + _F32(p["eps"])  # inside the square root, and eps does not start the history
    np.sqrt(div, out=div)
    np.divide(g, div, out=div)
    div += w * _F32(wd)
    div *= _F32(-lr)
    w += div


def _state_names(name: str, rule: str, p: Dict[str, Any]) -> List[str]:
    """The state arrays of one index, by the framework's own names for them."""
    if rule == "torch":
        if name == "sgd":
            return ["momentum_buffer"] if p["momentum"] != 0 else []
        if name in ("adam", "adamw"):
            return ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if p["amsgrad"] else [])
        if name == "rmsprop":
            return (["square_avg"] + (["momentum_buffer"] if p["momentum"] > 0 else [])
                    + (["grad_avg"] if p["centered"] else []))
        return ["sum"]
    if name == "sgd":
        return ["momentum"] if p["momentum"] > 0 else []
    if name == "adam":
        return ["mean", "var"]
    if name == "rmsprop":
        return ["n", "g", "delta"] if p["centered"] else ["n"]
    return ["history"]


_RULES: Dict[Tuple[str, str], _StepFn] = {
    ("sgd", "torch"): _sgd_torch, ("adam", "torch"): _adam_torch, ("adamw", "torch"): _adamw_torch,
    ("rmsprop", "torch"): _rmsprop_torch, ("adagrad", "torch"): _adagrad_torch,
    ("sgd", "mxnet"): _sgd_mxnet, ("adam", "mxnet"): _adam_mxnet, ("rmsprop", "mxnet"): _rmsprop_mxnet,
    ("adagrad", "mxnet"): _adagrad_mxnet,
}


# -- the updater ------------------------------------------------------------------------------------------

class NeutralUpdater:
    """One optimizer and its per-index states, for every key of a global server; numpy only."""

    def __init__(self, spec: Mapping[str, Any]):
        self.spec = normalize_spec(spec)
        self.name: str = self.spec["name"]
        self.rule: str = self.spec["rule"]
        self.params: Dict[str, Any] = self.spec["params"]
        self.lr: float = self.spec["lr"]
        self._lr_mult = _multipliers(self.spec["lr_mult"], "lr_mult")
        self._wd_mult = _multipliers(self.spec["wd_mult"], "wd_mult")
        self._wd = float(self.params["weight_decay" if self.rule == "torch" else "wd"])
        sched = self.spec["schedule"]
        self._schedule = _Schedule(sched, self.rule) if sched is not None else None
        self._step = _RULES[(self.name, self.rule)]
        self._state_names = _state_names(self.name, self.rule, self.params)
        self.states: Dict[int, Dict[str, np.ndarray]] = {}
        self.counts: Dict[int, int] = {}
        self.num_update = 0

    # -- learning rate --------------------------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        """A new base learning rate (the master worker's own schedule); a spec's schedule scales it."""
        self.lr = _number(lr, "lr", low=0.0)

    def current_lr(self, num_update: Optional[int] = None) -> float:
        """The base rate at ``num_update`` (default: the last update's), before any key's multiplier."""
        n = self.num_update if num_update is None else num_update
        return self._schedule(self.lr, n) if self._schedule is not None else self.lr

    def _multiplier(self, table: Dict[int, float], key: int, index: int) -> float:
        if index in table:
            return table[index]
        return table.get(key, 1.0)  # a P3 slice's index inherits its key's

    # -- one update -----------------------------------------------------------------------------------
    def apply(self, key: int, index: int, store: np.ndarray, grad: np.ndarray) -> np.ndarray:
        """The new weights of ``key`` (a new flat array) after one step with ``grad`` from ``store``.

        ``index`` is the optimizer's index for the update: the key, or a P3 slice's own index (its own
        states and update count, its key's multipliers). Neither ``store`` nor ``grad`` is written:
        the store may still be queued in a zero-copy send. The arithmetic is float32; the result has
        the store's dtype.
        """
        if store.size != grad.size:
            raise GeoMXError(f"optimizer index {index} (key {key}): gradient of {grad.size} elements for "
                             f"weights of {store.size}")
        weight = np.array(store, dtype=_F32, copy=True).reshape(-1)
        g = np.asarray(grad, dtype=_F32).reshape(-1)
        states = self.states.get(index)
        if states is None:
            initial = _F32(self.params.get("initial_accumulator_value", 0.0)) if self.name == "adagrad" else 0
            states = self.states[index] = {n: np.full(weight.size, initial if n == "sum" else 0, dtype=_F32)
                                           for n in self._state_names}
        elif any(s.size != weight.size for s in states.values()):
            raise GeoMXError(f"optimizer index {index} (key {key}) has states of "
                             f"{next(iter(states.values())).size} elements, weights of {weight.size}")
        count = self.counts.get(index, 0) + 1
        self.counts[index] = count
        self.num_update = max(self.num_update, count)
        lr = self.current_lr() * self._multiplier(self._lr_mult, key, index)
        wd = self._wd * self._multiplier(self._wd_mult, key, index)
        self._step(weight, g, states, self.params, lr, wd, count)
        return weight if store.dtype == _F32 else weight.astype(store.dtype)

    # -- bookkeeping and checkpoints -------------------------------------------------------------------
    def update_counts(self) -> Tuple[Dict[int, int], int]:
        """Per-index update counts and ``num_update`` (the highest count: the schedule's clock)."""
        return dict(self.counts), self.num_update

    def restore_counts(self, counts: Iterable[Tuple[int, int]], num_update: int) -> None:
        for index, count in counts:
            self.counts[int(index)] = int(count)
        self.num_update = int(num_update)

    def state_dict(self) -> Dict[str, Any]:
        """``{"meta": JSON-safe dict, "arrays": {"<index>/<state>": float32 array}}``: everything to
        continue exactly where this updater is (the arrays are copies)."""
        meta = {"format": STATE_FORMAT, "spec": copy.deepcopy(self.spec), "lr": self.lr, "num_update": self.num_update,
                "counts": {str(i): c for i, c in self.counts.items()},
                "states": {str(i): sorted(s) for i, s in self.states.items()}}
        arrays = {f"{i}/{n}": a.copy() for i, s in self.states.items() for n, a in s.items()}
        return {"meta": meta, "arrays": arrays}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the learning rate, counts and states with those of :meth:`state_dict` (checked)."""
        try:
            meta, arrays = state["meta"], state["arrays"]
            if meta.get("format") != STATE_FORMAT:
                raise OptimizerSpecError(f"optimizer state format {meta.get('format')!r}, expected {STATE_FORMAT}")
            saved = meta["spec"]
            if (saved["name"], saved["rule"]) != (self.name, self.rule):
                raise OptimizerSpecError(f"optimizer state of {saved['name']} ({saved['rule']} rule) cannot be "
                                         f"loaded into {self.name} ({self.rule} rule)")
            states: Dict[int, Dict[str, np.ndarray]] = {}
            for index, names in meta["states"].items():
                if sorted(names) != sorted(self._state_names):
                    raise OptimizerSpecError(f"optimizer state of index {index} holds {names}, this "
                                             f"optimizer keeps {self._state_names}")
                parts = {n: np.array(arrays[f"{index}/{n}"], dtype=_F32, copy=True).reshape(-1) for n in names}
                if len({a.size for a in parts.values()}) > 1:
                    raise OptimizerSpecError(f"optimizer state of index {index}: arrays of different sizes")
                states[int(index)] = parts
            counts = {int(i): int(c) for i, c in meta["counts"].items()}
            lr = _number(meta["lr"], "saved lr", low=0.0)
            num_update = int(meta["num_update"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise OptimizerSpecError(f"malformed optimizer state: {type(exc).__name__}: {exc}") from None
        self.states, self.counts, self.num_update, self.lr = states, counts, num_update, lr
