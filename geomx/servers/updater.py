"""The global server's optimizer, run by one of two engines chosen once from the master worker's spec.

An :class:`Updater` is built from the optimizer description the master worker sent
(:mod:`geomx.optimizer_spec`: data, never a pickle) and applies it to one key (or P3 slice) at a time.

* The numpy engine (:class:`~geomx.servers.optimizers.NeutralUpdater`, rule ``"mxnet"``) runs every spec
  that :func:`neutral_spec` maps exactly: MXNet's SGD (with or without momentum), Adam, RMSProp and
  AdaGrad with their ``wd``, ``rescale_grad``, ``clip_gradient``, per-key multipliers and a fresh stock
  scheduler whose MXNet semantics the numpy schedule reproduces. It is bit-identical to MXNet 1.9.1's
  updater on float32 weights and never imports MXNet.
* Everything else (NAG, DC-ASGD, Signum, custom registered optimizers, a spec that does not map
  exactly) runs through MXNet's own updater, which keeps the optimizer's states and update counts;
  MXNet is imported then, and only then. A numpy-engine updater that meets a key that is not float32
  (the numpy rules are float32) hands its counts and states to a new MXNet engine and continues there.
  Plain SGD on float32 keys in this engine still runs in numpy (``optimizer_spec.sgd_step``, MXNet's
  bookkeeping), as before.

Both engines describe their states in one layout, MXNet's (per index: ``None``, an array, or a tuple of
arrays in the order of MXNet's ``create_state``), so a checkpoint or SET_STATES written by either engine
loads into either (:meth:`Updater.load_states`). MXNet is imported here and nowhere else in
:mod:`geomx.servers`; a server that only sums (HFA, ESync, BSC with local optimizers) never imports it.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np

from ..errors import GeoMXError
from ..optimizer_spec import sgd_step, states_from_wire, states_to_wire
from .optimizers import NeutralUpdater, OptimizerSpecError, normalize_spec

log = logging.getLogger("geomx.servers.updater")

NUMPY, MXNET = "numpy", "mxnet"

# MXNet optimizer hyper-parameters (as optimizer_to_spec names them) the numpy engine's mxnet rule takes
_NEUTRAL_PARAMS = {"sgd": {"momentum"}, "adam": {"beta1", "beta2", "epsilon"},
                   "rmsprop": {"gamma1", "gamma2", "epsilon", "centered", "clip_weights"}, "adagrad": {"eps"}}
_COMMON_PARAMS = {"wd", "rescale_grad", "clip_gradient", "lazy_update", "multi_precision"}
_BOOKKEEPING = {"learning_rate", "begin_num_update"}  # the base rate, and the spec's num_update overrides it
# MXNet's scheduler attributes that are its progress: a scheduler already stepped by the worker would
# continue from there in MXNet (with its base rate reset by the optimizer); the numpy schedule starts fresh
_SCHEDULER_PROGRESS = {"FactorScheduler": {"count": 0}, "MultiFactorScheduler": {"count": 0, "cur_step_ind": 0}}


def _schedule(sched: Dict[str, Any], lr: Optional[float], begin: int) -> Tuple[Optional[dict], float, str]:
    """The numpy schedule equal to MXNet's ``sched`` (a spec's ``lr_scheduler``), its base rate, and
    why not (``None, 0, reason``) where MXNet's stateful scheduler would give other rates."""
    kind, state = sched.get("class"), sched.get("state") or {}
    base = lr if lr is not None else state.get("base_lr")
    if not isinstance(base, (int, float)) or isinstance(base, bool):
        return None, 0.0, f"{kind} has no numeric base rate ({base!r})"
    for attr, fresh in _SCHEDULER_PROGRESS.get(kind, {}).items():
        if state.get(attr, fresh) != fresh:
            return None, 0.0, f"{kind} was already stepped ({attr} = {state.get(attr)!r})"
    warmup = {"warmup_steps": state.get("warmup_steps", 0), "warmup_begin_lr": state.get("warmup_begin_lr", 0),
              "warmup_mode": state.get("warmup_mode", "linear")}
    if warmup["warmup_steps"] and state.get("warmup_final_lr") != base:
        # MXNet's warmup climbs to the scheduler's own base_lr, which learning_rate does not reset
        return None, 0.0, (f"{kind}'s warmup ends at {state.get('warmup_final_lr')!r}, the optimizer's rate is "
                           f"{base!r}")
    if kind == "FactorScheduler":
        return {"type": "step", "step": state.get("step"), "factor": state.get("factor"),
                "min_lr": state.get("stop_factor_lr"), **warmup}, base, ""
    if kind == "MultiFactorScheduler":
        return {"type": "multistep", "milestones": state.get("step"), "factor": state.get("factor"), **warmup}, base, ""
    if kind in ("CosineScheduler", "PolyScheduler"):
        top = state.get("max_update")
        if state.get("base_lr_orig") != base:
            # MXNet decays from the scheduler's base_lr_orig, which learning_rate does not reset
            return None, 0.0, f"{kind} decays from {state.get('base_lr_orig')!r}, the optimizer's rate is {base!r}"
        if not isinstance(top, int) or state.get("max_steps") != top - warmup["warmup_steps"]:
            return None, 0.0, f"{kind} has an inconsistent max_update/max_steps"
        if begin + 1 > top:
            # MXNet's scheduler never computes a rate then: it holds its base_lr, not final_lr
            return None, 0.0, f"{kind} starts past its max_update ({begin} updates already made, max {top})"
        out = {"type": "cosine" if kind == "CosineScheduler" else "poly", "max_update": top,
               "final_lr": state.get("final_lr"), **warmup}
        if kind == "PolyScheduler":
            out["power"] = state.get("power")
        return out, base, ""
    return None, 0.0, f"learning-rate scheduler {kind!r} has no numpy schedule"


def neutral_spec(spec: Dict[str, Any]) -> Tuple[Optional[Dict[str, Any]], str]:
    """The numpy engine's spec (:mod:`geomx.servers.optimizers`, rule ``"mxnet"``) that runs the MXNet
    optimizer ``spec`` describes exactly, or ``(None, why not)``; needs no MXNet."""
    name = spec.get("name")
    if name not in _NEUTRAL_PARAMS:
        return None, f"optimizer {name!r} has no numpy engine (it runs: {', '.join(sorted(_NEUTRAL_PARAMS))})"
    params = dict(spec.get("params") or {})
    unknown = sorted(set(params) - _NEUTRAL_PARAMS[name] - _COMMON_PARAMS - _BOOKKEEPING)
    if unknown:
        return None, f"{name} parameter(s) {', '.join(unknown)} have no numpy equivalent"
    lr = params.pop("learning_rate", None)
    params.pop("begin_num_update", None)
    begin = spec.get("num_update", 0)
    if not isinstance(begin, int) or isinstance(begin, bool) or begin < 0:
        return None, f"num_update {begin!r} is not a count"
    mults: Dict[str, Dict[str, Any]] = {}
    for table in ("lr_mult", "wd_mult"):
        mults[table] = dict(spec.get(table) or {})
        if not all(isinstance(k, str) and k.isdigit() for k in mults[table]):
            # names, or negative indices (a P3 slice's own index: MXNet's path overwrites it with the key's)
            return None, f"{table} has keys other than key numbers: {sorted(mults[table])[:5]}"
    schedule = None
    if spec.get("lr_scheduler") is not None:
        schedule, lr, why = _schedule(spec["lr_scheduler"], lr, begin)
        if schedule is None:
            return None, why
    elif lr is None:
        lr = 0.01  # MXNet's default rate without a scheduler
    out = {"name": name, "rule": "mxnet", "lr": lr, "params": params, "schedule": schedule, **mults}
    try:
        return normalize_spec(out), ""
    except OptimizerSpecError as exc:
        return None, str(exc)


def _import_mxnet(why: str) -> Any:
    """MXNet, imported now if it was not yet (seconds: on the event loop it delays heartbeats)."""
    if "mxnet" in sys.modules:
        return sys.modules["mxnet"]
    start = time.monotonic()
    try:
        import mxnet as mx
    except ImportError as exc:  # the core installs without MXNet: say so to the master worker, not "No module"
        raise GeoMXError(f"the global server needs MXNet for this optimizer ({why}), and MXNet is not installed "
                         "where it runs: pip install 'geomx[mxnet]' (Python 3.9-3.12), or set an optimizer the "
                         "numpy engine runs") from exc

    took = time.monotonic() - start
    (log.warning if took > 1.0 else log.info)("imported MXNet for the optimizer in %.1f s (%s)", took, why)
    return mx


class Updater:
    """One optimizer and its states, for every key of a global server.

    ``engine`` forces ``"numpy"`` or ``"mxnet"`` (tests; numpy refuses a spec that does not map);
    by default the numpy engine runs every spec :func:`neutral_spec` maps. ``engine_reason`` says why
    the engine is what it is.
    """

    def __init__(self, spec: Dict[str, Any], engine: Optional[str] = None):
        self.spec = spec
        if spec.get("rule") == "torch":
            self._start_torch_rule(spec, engine)
            return
        neutral, why = neutral_spec(spec)
        if engine == NUMPY and neutral is None:
            raise GeoMXError(f"optimizer {spec.get('name')!r} cannot run in numpy: {why}")
        if engine not in (None, NUMPY, MXNET):
            raise GeoMXError(f"unknown optimizer engine {engine!r}: numpy or mxnet")
        self.optimizer: Any = None  # the MXNet optimizer (MXNet engine only)
        self.plain_sgd = False
        self._neutral: Optional[NeutralUpdater] = None
        self._begin = int(spec.get("num_update", 0) or 0)
        if neutral is not None and engine != MXNET:
            self.engine, self.engine_reason = NUMPY, "maps exactly onto the numpy engine (rule mxnet)"
            self._neutral = NeutralUpdater(neutral)
            self._neutral.num_update = self._begin  # MXNet's begin_num_update
        else:
            self._start_mxnet(why or "engine mxnet asked for")

    def _start_torch_rule(self, spec: Dict[str, Any], engine: Optional[str]) -> None:
        """A spec from the PyTorch front end (``rule: torch``): the numpy engine only, never MXNet."""
        if engine not in (None, NUMPY):
            raise GeoMXError(f"optimizer engine {engine!r}: a torch-rule spec runs in the numpy engine only")
        try:
            neutral = normalize_spec(spec)
        except OptimizerSpecError as exc:
            raise GeoMXError(f"the global server cannot run this optimizer: {exc}") from None
        self.optimizer = None
        self.plain_sgd = False
        self._begin = 0
        self.engine, self.engine_reason = NUMPY, "torch.optim's rule"
        self._neutral = NeutralUpdater(neutral)

    def _start_mxnet(self, why: str) -> None:
        from ..optimizer_spec import is_plain_sgd, optimizer_from_spec

        mx = _import_mxnet(f"{self.spec.get('name')}: {why}")
        self.engine, self.engine_reason = MXNET, why
        self._mx = mx
        self.optimizer = optimizer_from_spec(self.spec)
        self._updater = mx.optimizer.get_updater(self.optimizer)
        self.plain_sgd = is_plain_sgd(self.optimizer)  # numpy arithmetic, MXNet's bookkeeping (sgd_step)
        # MXNet's copy of the weights of each optimizer index (a key, or a P3 slice: each slice has its
        # own shape and state), for the optimizers that update an NDArray in place, with the array
        # apply() last returned for it: while the server's store is still that array the copy is
        # current; anything else (a checkpoint restore, a new INIT) is copied in.
        self._weights: Dict[Any, Tuple[Any, np.ndarray]] = {}

    def _numpy_to_mxnet(self, why: str) -> None:
        """Continue in MXNet's updater from where the numpy engine is (its counts and states); a
        torch-rule optimizer has no MXNet twin and is refused instead."""
        assert self._neutral is not None
        if self.spec.get("rule") == "torch":
            raise GeoMXError(f"the server runs torch.optim's rules on float32 weights only, in numpy ({why})")
        counts, num_update = self.update_counts()
        desc, blob = self.states_to_wire()
        log.warning("optimizer %s moves from the numpy engine to MXNet's: %s", self.name, why)
        self._neutral = None
        self._start_mxnet(why)
        self.restore_counts(counts.items(), num_update)
        self.load_states(desc, blob)

    @property
    def name(self) -> str:
        return self.spec["name"]

    # -- one update -----------------------------------------------------------------------------
    def apply(self, key: int, index: Any, store: np.ndarray, grad_np: np.ndarray,
              backup: Optional[np.ndarray] = None) -> np.ndarray:
        """The new weights of ``key`` (as a flat array) after one step with ``grad_np`` from ``store``.

        ``index`` is the optimizer's index for the update: the key, or a P3 slice's own index, which
        takes the key's learning-rate and weight-decay multipliers at its first update. ``backup``
        (DC-ASGD under MixedSync) is the weights the pushing party last received: the delay is
        compensated against those (the paper's per-worker backup), not against the key's last
        update by anyone.
        """
        neutral = self._neutral
        if neutral is not None:
            if store.dtype == np.float32 and backup is None:
                if index not in neutral.counts:
                    neutral.counts[index] = self._begin  # MXNet counts from begin_num_update
                return neutral.apply(key, index, store, grad_np)
            self._numpy_to_mxnet(f"key {key} is {store.dtype}, the numpy engine runs float32"
                                 if backup is None else "a DC-ASGD backup arrived")
        return self._apply_mxnet(key, index, store, grad_np, backup)

    def _apply_mxnet(self, key: int, index: Any, store: np.ndarray, grad_np: np.ndarray,
                     backup: Optional[np.ndarray]) -> np.ndarray:
        opt = self.optimizer
        states = self._updater.states
        if index != key and index not in states:
            for table in (opt.lr_mult, opt.wd_mult, opt.idx2name):
                if key in table:
                    table[index] = table[key]
        if self.plain_sgd and store.dtype == np.float32:
            states.setdefault(index, None)  # what MXNet's Updater records for it
            self._updater.states_synced[index] = True
            return sgd_step(opt, index, store, grad_np)
        mx = self._mx
        weight, current = self._weights.get(index, (None, None))
        if weight is None or weight.shape != store.shape or weight.dtype != store.dtype:
            weight = mx.nd.array(store, dtype=store.dtype)
        elif current is not store:
            weight._sync_copyfrom(store)
        if grad_np.flags.writeable and grad_np.flags.c_contiguous and grad_np.flags.aligned:
            # A round sum the server owns and drops after the update: lend it to MXNet (no copy).
            grad = mx.nd.from_numpy(grad_np, zero_copy=True)
        else:
            grad = mx.nd.empty(grad_np.shape, dtype=store.dtype)
            grad._sync_copyfrom(grad_np)
        if backup is not None:
            state = states.get(index)
            if state is None:
                state = states[index] = opt.create_state(index, weight)
                self._updater.states_synced[index] = True
            state[1][:] = backup.reshape(state[1].shape)
        self._updater(index, grad, weight)
        value = weight.asnumpy().reshape(-1)
        self._weights[index] = (weight, value)
        return value

    # -- what a checkpoint or GET_STATES carries ---------------------------------------------------
    def update_counts(self) -> Tuple[Dict[Any, int], int]:
        """Per-index update counts and the optimizer's total (learning-rate schedules read them)."""
        if self._neutral is not None:
            return self._neutral.update_counts()
        return dict(self.optimizer._index_update_count), int(self.optimizer.num_update)

    def restore_counts(self, counts: Iterable[Tuple[Any, int]], num_update: int) -> None:
        if self._neutral is not None:
            # a count of 0 is not restored, as in MXNet's engine: that index starts at begin_num_update
            self._neutral.restore_counts(((i, c) for i, c in counts if c), num_update)
            return
        for index, count in counts:
            if count:
                self.optimizer._index_update_count[index] = count
        self.optimizer.num_update = num_update

    def states_to_wire(self) -> Tuple[dict, np.ndarray]:
        """Every index's states in MXNet's layout (whichever engine holds them), as JSON + one buffer."""
        if self._neutral is not None:
            layout = {index: self._mx_layout([parts[n] for n in self._neutral_names()])
                      for index, parts in self._neutral.states.items()}
            return states_to_wire(layout)
        return states_to_wire(self._updater.states)

    def load_states(self, desc: dict, blob: np.ndarray) -> None:
        """Replace every state with the ones described (from a checkpoint or SET_STATES, written by
        either engine). States the numpy engine cannot hold (not float32) move it to MXNet's."""
        states = states_from_wire(desc, blob)
        if self._neutral is not None:
            parts = {index: self._flat_states(index, state) for index, state in states.items()}
            if all(a.dtype == np.float32 for arrays in parts.values() for a in arrays):
                names = self._neutral_names()
                self._neutral.states = {index: {n: a.reshape(-1).copy() for n, a in zip(names, arrays)}
                                        for index, arrays in parts.items()}
                return
            self._numpy_to_mxnet("the states loaded are not float32")
        mx = self._mx

        def to_nd(node: Any) -> Any:
            if node is None:
                return None
            if isinstance(node, tuple):
                return tuple(to_nd(x) for x in node)
            return mx.nd.array(node, dtype=node.dtype)

        self._updater.states = {k: to_nd(v) for k, v in states.items()}
        self._updater.states_synced = {k: False for k in states}

    # -- MXNet's state layout for the numpy engine ----------------------------------------------------
    def _neutral_names(self) -> List[str]:
        assert self._neutral is not None
        return list(self._neutral._state_names)  # in the order of MXNet's create_state

    def _mx_layout(self, arrays: List[np.ndarray]) -> Any:
        """What MXNet's ``create_state`` returns for this optimizer: SGD and AdaGrad an array (SGD
        without momentum None), Adam and RMSProp a tuple (RMSProp's plain variant one of one)."""
        if self.name in ("sgd", "adagrad"):
            return arrays[0] if arrays else None
        return tuple(arrays)

    def _flat_states(self, index: int, state: Any) -> List[np.ndarray]:
        arrays = [] if state is None else list(state) if isinstance(state, tuple) else [state]
        names = self._neutral_names()
        sizes = {a.size for a in arrays}
        if len(arrays) != len(names) or any(not isinstance(a, np.ndarray) for a in arrays) or len(sizes) > 1:
            raise GeoMXError(f"optimizer states of index {index} do not fit {self.name} "
                             f"({len(names)} array(s) of one size: {', '.join(names) or 'none'})")
        return arrays
