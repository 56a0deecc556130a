"""The global server's optimizer: the servers' only contact with MXNet.

An :class:`Updater` is built from the optimizer description the master worker sent
(:mod:`geomx.optimizer_spec`: data, never a pickle) and applies it to one key (or P3 slice) at a time:
plain SGD in numpy (about 7x faster than MXNet's kernel on one core, and no copy out of an NDArray),
every other optimizer through MXNet's own updater, which keeps the optimizer's states and per-key
update counts. MXNet is imported here and nowhere else in :mod:`geomx.servers`, and only once an
optimizer is set: a server that only sums (HFA, ESync, BSC with local optimizers) never imports it.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Tuple

import numpy as np

from ..optimizer_spec import is_plain_sgd, optimizer_from_spec, sgd_step, states_from_wire, states_to_wire


class Updater:
    """One optimizer and its states, for every key of a global server."""

    def __init__(self, spec: Dict[str, Any]):
        import mxnet as mx

        self.spec = spec
        self.optimizer = optimizer_from_spec(spec)
        self._mx = mx
        self._updater = mx.optimizer.get_updater(self.optimizer)
        self.plain_sgd = is_plain_sgd(self.optimizer)
        # MXNet's copy of the weights of each optimizer index (a key, or a P3 slice: each slice has its
        # own shape and state), for the optimizers that update an NDArray in place, with the array
        # apply() last returned for it: while the server's store is still that array the copy is
        # current; anything else (a checkpoint restore, a plain-SGD step, a new INIT) is copied in.
        self._weights: Dict[Any, Tuple[Any, np.ndarray]] = {}

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
        return dict(self.optimizer._index_update_count), int(self.optimizer.num_update)

    def restore_counts(self, counts: Iterable[Tuple[Any, int]], num_update: int) -> None:
        for index, count in counts:
            if count:
                self.optimizer._index_update_count[index] = count
        self.optimizer.num_update = num_update

    def states_to_wire(self) -> Tuple[dict, np.ndarray]:
        return states_to_wire(self._updater.states)

    def load_states(self, desc: dict, blob: np.ndarray) -> None:
        """Replace every state with the ones described (from a checkpoint or SET_STATES)."""
        mx = self._mx

        def to_nd(node: Any) -> Any:
            if node is None:
                return None
            if isinstance(node, tuple):
                return tuple(to_nd(x) for x in node)
            return mx.nd.array(node, dtype=node.dtype)

        states = states_from_wire(desc, blob)
        self._updater.states = {k: to_nd(v) for k, v in states.items()}
        self._updater.states_synced = {k: False for k in states}
