"""Optimizers cross the network as data, never as pickles: the registered name, the scalar
hyper-parameters of its constructor, per-key learning-rate / weight-decay multipliers and, for the
stock schedulers, the scheduler's class and scalar settings. The global server rebuilds the optimizer
with ``mx.optimizer.create``. Also the safe (JSON + raw arrays) form of optimizer states."""
from __future__ import annotations

import inspect
import json
from typing import Any, Dict, List, Tuple

import numpy as np

from .errors import GeoMXError

_SCALARS = (bool, int, float, str, type(None))
# Base-class arguments that are not hyper-parameters or are rebuilt separately.
_SKIP = {"self", "kwargs", "param_idx2name", "sym", "param_dict", "lr_scheduler"}
_SCHEDULERS = ("FactorScheduler", "MultiFactorScheduler", "PolyScheduler", "CosineScheduler")
# Constructor arguments an optimizer keeps under another attribute name (MXNet's AdaGrad keeps eps as
# float_stable_eps): without this the spec would lose them and the server run with the default.
_ATTRIBUTES = {("adagrad", "eps"): "float_stable_eps"}


def _registered_name(opt: Any) -> str:
    import mxnet as mx

    for name, cls in mx.optimizer.Optimizer.opt_registry.items():
        if cls is type(opt):
            return name
    raise GeoMXError(f"optimizer {type(opt).__name__} is not registered with mx.optimizer.register; "
                     "the global server can only build registered optimizers")


def _constructor_args(cls: type) -> List[str]:
    names: List[str] = []
    for klass in cls.__mro__:
        if klass is object or "__init__" not in vars(klass):
            continue
        for pname in inspect.signature(klass.__init__).parameters:
            if pname not in _SKIP and pname not in names:
                names.append(pname)
    return names


def _scalar(value: Any, what: str) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (list, tuple)) and all(isinstance(v, _SCALARS) for v in value):
        return list(value)
    if not isinstance(value, _SCALARS):
        raise GeoMXError(f"{what} = {value!r} cannot be sent to the global server (only plain numbers, "
                         "strings and booleans can)")
    return value


def optimizer_to_spec(opt: Any) -> Dict[str, Any]:
    """Describe ``opt`` (an ``mx.optimizer.Optimizer``) as JSON-safe data."""
    name = _registered_name(opt)
    params: Dict[str, Any] = {}
    for arg in _constructor_args(type(opt)):
        attr = _ATTRIBUTES.get((name, arg), "lr" if arg == "learning_rate" else arg)
        if hasattr(opt, attr):
            params[arg] = _scalar(getattr(opt, attr), f"{name}.{arg}")
    lr_mult = {str(k): float(v) for k, v in opt.lr_mult.items()}
    wd_mult = {str(k): float(v) for k, v in opt.wd_mult.items()}
    for idx, param in getattr(opt, "param_dict", {}).items():
        lr_mult.setdefault(str(idx), float(param.lr_mult))
        wd_mult.setdefault(str(idx), float(param.wd_mult))
    spec: Dict[str, Any] = {"name": name, "params": params, "lr_mult": lr_mult, "wd_mult": wd_mult,
                            "num_update": int(opt.num_update)}
    sched = opt.lr_scheduler
    if sched is not None:
        kind = type(sched).__name__
        if kind not in _SCHEDULERS:
            raise GeoMXError(f"learning-rate scheduler {kind} cannot be sent to the global server "
                             f"(supported: {', '.join(_SCHEDULERS)})")
        spec["lr_scheduler"] = {"class": kind, "state": {k: _scalar(v, f"{kind}.{k}")
                                                         for k, v in vars(sched).items()}}
    return spec


def optimizer_from_spec(spec: Dict[str, Any]) -> Any:
    """Build the optimizer ``spec`` describes; GeoMXError with the reason if it cannot be built."""
    import mxnet as mx

    try:
        name = spec["name"]
        params = dict(spec["params"])
        if not isinstance(name, str) or name not in mx.optimizer.Optimizer.opt_registry:
            raise GeoMXError(f"unknown optimizer {name!r}")
        sched_spec = spec.get("lr_scheduler")
        if sched_spec is not None:
            kind = sched_spec["class"]
            if kind not in _SCHEDULERS:
                raise GeoMXError(f"unsupported learning-rate scheduler {kind!r}")
            sched = object.__new__(getattr(mx.lr_scheduler, kind))
            for k, v in sched_spec["state"].items():
                setattr(sched, str(k), v)
            params["lr_scheduler"] = sched
        opt = mx.optimizer.create(name, **params)
        opt.set_lr_mult({int(k): float(v) for k, v in spec.get("lr_mult", {}).items()})
        opt.set_wd_mult({int(k): float(v) for k, v in spec.get("wd_mult", {}).items()})
        opt.num_update = opt.begin_num_update = int(spec.get("num_update", 0))
        return opt
    except GeoMXError:
        raise
    except Exception as exc:  # noqa: BLE001 - any construction failure is reported to the caller
        raise GeoMXError(f"cannot build optimizer from {json.dumps(spec)[:300]}: {exc}") from None


# -- optimizer states as JSON structure + one byte buffer ------------------------------------------

def states_to_wire(states: Dict[int, Any]) -> Tuple[dict, np.ndarray]:
    """Flatten ``{key: state}`` (state: NDArray, None, or nested tuples/lists of them) into a JSON
    description and one uint8 buffer."""
    chunks: List[Tuple[np.ndarray, int]] = []  # (array, its offset in the buffer)
    offset = 0

    def walk(node: Any) -> Any:
        nonlocal offset
        if node is None:
            return None
        if isinstance(node, (tuple, list)):
            return {"seq": [walk(x) for x in node]}
        arr = np.ascontiguousarray(node.asnumpy() if hasattr(node, "asnumpy") else np.asarray(node))
        desc = {"dtype": arr.dtype.str, "shape": list(arr.shape), "offset": offset, "nbytes": arr.nbytes}
        chunks.append((arr, offset))
        offset += arr.nbytes
        return desc

    tree = {str(k): walk(v) for k, v in states.items()}
    # One buffer, filled in place (a checkpoint of a large model copies its states once, not twice).
    blob = np.empty(offset, dtype=np.uint8)
    for arr, start in chunks:
        blob[start:start + arr.nbytes] = arr.reshape(-1).view(np.uint8)
    return {"states": tree}, blob


_ALLOWED_STATE_DTYPES = {"<f4", "<f2", "<f8", "<i4", "<i8"}


def states_from_wire(desc: dict, blob: np.ndarray) -> Dict[int, Any]:
    """Inverse of :func:`states_to_wire`, returning numpy arrays; validates every offset and dtype."""
    raw = memoryview(np.ascontiguousarray(blob)).cast("B")

    def walk(node: Any) -> Any:
        if node is None:
            return None
        if not isinstance(node, dict):
            raise GeoMXError("malformed optimizer state description")
        if "seq" in node:
            return tuple(walk(x) for x in node["seq"])
        dtype, shape, off, nbytes = node["dtype"], node["shape"], node["offset"], node["nbytes"]
        if dtype not in _ALLOWED_STATE_DTYPES or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise GeoMXError(f"optimizer state with bad dtype/shape {dtype} {shape}")
        if not (0 <= off and off + nbytes <= len(raw)) or int(np.prod(shape)) * np.dtype(dtype).itemsize != nbytes:
            raise GeoMXError("optimizer state slice out of bounds")
        return np.frombuffer(raw[off:off + nbytes], dtype=dtype).reshape(shape).copy()

    try:
        return {int(k): walk(v) for k, v in desc["states"].items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise GeoMXError(f"malformed optimizer state description: {exc}") from None


# -- the global server's numpy path for plain SGD -------------------------------------------------

def is_plain_sgd(opt: Any) -> bool:
    """MXNet's SGD without momentum: stateless, so the global server can run its update in numpy
    (``sgd_step``). MXNet's CPU kernel for it (``multi_sgd_update``) takes ~3 ms per million float32
    elements on one core, numpy's two passes ~0.4 ms (benchmarks/bench_sgd.py, docs/Benchmarks.md)."""
    import mxnet as mx

    return type(opt) is mx.optimizer.SGD and not opt.momentum > 0


def sgd_step(opt: Any, index: Any, weight: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """One update of ``opt`` (``is_plain_sgd``) on float32 ``weight`` with ``grad``, as a new array
    (``weight`` may still be queued in a zero-copy send). The optimizer's bookkeeping is MXNet's own:
    update counts, learning-rate scheduler, per-key lr/wd multipliers. The arithmetic is that of
    MXNet's ``multi_sgd_update`` in float32: ``w + ((0 - lr*wd*w) - lr*clip(rescale*g))``; a compiler's
    fused multiply-add in MXNet's build can make it differ in the last bit."""
    opt._update_count(index)
    f32 = np.float32
    lr = f32(opt._get_lrs([index])[0])
    wd = f32(opt._get_wds([index])[0])
    rescale = f32(opt.rescale_grad)
    if opt.clip_gradient:  # MXNet applies it when truthy
        bound = f32(opt.clip_gradient)
        step = np.multiply(grad, rescale)
        np.clip(step, -bound, bound, out=step)
        np.multiply(step, -lr, out=step)
    else:
        step = np.multiply(grad, -(lr * rescale))
    if wd != 0:
        step -= weight * (lr * wd)
    step += weight
    return step
