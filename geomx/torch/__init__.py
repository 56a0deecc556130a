"""The PyTorch front end: geomx's two-tier parameter server behind a torch optimizer.

::

    import torch, geomx.torch as gx
    gx.init()                                    # role, party, ranks from the launcher's variables
    opt = gx.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3),
                                  named_parameters=model.named_parameters())
    gx.broadcast_parameters(model.state_dict())  # the master worker's values become everyone's
    if not gx.is_master_worker():                # the master worker coordinates and does not train
        for x, y in loader:
            opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()

Gradients are averaged over every training worker of every party (DDP's and Horovod's semantics: the
learning rate of one process). Each gradient is sent as soon as backward has accumulated it (a
post-accumulate-grad hook), with the priority of its place in the model, so the first layers' values,
which the next forward pass needs first, come back first (P3 when ``ENABLE_P3=1``).

* ``mode="server"`` (default): the global servers run the optimizer (torch.optim's update rule, in
  numpy: SGD, Adam, AdamW, RMSprop, Adagrad) and send back weights.
* ``mode="local"``: the servers sum; every worker receives the averaged gradient and steps its own
  optimizer (any torch optimizer).
* HFA (``MXNET_KVSTORE_USE_HFA=1``): every worker steps its own optimizer; every K1 steps the party
  averages its models, every K2 party averages the parties do (the servers average weights). ESync
  (``GEOMX_USE_ESYNC=1``): the same, every round global, with the global server assigning each party
  its local steps (``opt.esync_steps``); stop on ``opt.mean_steps``.

Everything below the optimizer (codecs, MixedSync, P3, several global servers, DGT, TSEngine, CURVE,
checkpoints on the servers) is the core's, configured by the same variables as for MXNet.
docs/PyTorch.md is the guide.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np

try:
    import torch
except ImportError as exc:  # the core installs without a framework
    raise ImportError("geomx.torch needs PyTorch: pip install 'geomx[torch]' (or install the torch build you "
                      "want first, then geomx)") from exc

from .. import config
from ..errors import GeoMXError
from ..servers.sync.esync import ESYNC_KEY
from ..store import Store, key_id
from .spec import optimizer_to_spec

__all__ = ["init", "is_initialized", "rank", "size", "party", "local_rank", "local_size", "is_master_worker",
           "DistributedOptimizer", "broadcast_parameters", "barrier", "report_loss", "report_accuracy",
           "report_progress", "save_checkpoint", "shutdown", "store", "key_id"]

_store: Optional[Store] = None
# name -> the INIT of its key (the global servers' copy), shared by the optimizer and broadcast_parameters.
_declared: Dict[str, cf.Future] = {}


# -- the process's place ------------------------------------------------------------------------------

def init(sync: Union[None, bool, str] = None) -> None:
    """Join the topology as a worker (the launcher's DMLC_* / GEOMX_* variables say where).

    ``sync``: ``"sync"`` / True (FSA) or ``"async"`` / False (MixedSync across parties); None reads
    GEOMX_SYNC_MODE (default sync). Only the master worker's choice counts, as in GeoMX.
    """
    global _store
    if _store is not None and not _store.closed:
        raise GeoMXError("geomx.torch.init() was already called in this process")
    cfg = config.load()
    if sync is None:
        sync = cfg.sync_mode
    if isinstance(sync, str):
        if sync not in ("sync", "async"):
            raise GeoMXError(f"init(sync={sync!r}): 'sync' (FSA) or 'async' (MixedSync)")
        sync = sync == "sync"
    _declared.clear()
    _store = Store(sync=bool(sync), cfg=cfg, what="geomx.torch.init()")


def is_initialized() -> bool:
    return _store is not None and not _store.closed


def store() -> Store:
    """The process's :class:`geomx.store.Store` (after :func:`init`)."""
    if _store is None:
        raise GeoMXError("call geomx.torch.init() first")
    return _store


def rank() -> int:
    """This worker's place among every training worker, parties' workers first (the data slice the
    launcher gives it as ``{slice}``); the party rank when started without the launcher."""
    s = store()
    return s.cfg.data_slice if s.cfg.data_slice is not None else s.rank


def size() -> int:
    """Training workers in the whole topology (gradients are averaged over them)."""
    return store().num_all_workers


def local_rank() -> int:
    """This worker's rank inside its party."""
    return store().rank


def local_size() -> int:
    """Workers of this worker's party."""
    return store().num_workers


def party() -> Optional[str]:
    """This worker's party ("party0", ..., "central"), as the launcher names it; None without it."""
    return store().cfg.party


def is_master_worker() -> bool:
    """The central party's coordinating worker: it sets the optimizer and the initial values and
    does not train."""
    return store().is_master_worker


def barrier() -> None:
    """Wait until every worker of the topology reached this point."""
    store().barrier()


def report_loss(loss: float) -> None:
    """This worker's training loss, for DGT's adaptive K (``ADAPTIVE_K_FLAG=1``)."""
    store().report_loss(float(loss))


def report_accuracy(accuracy: float) -> None:
    """This worker's latest accuracy in [0, 1], for its metrics and the launcher's status page."""
    store().report_accuracy(float(accuracy))


def report_progress(step: int, total: Optional[int] = None) -> None:
    """Steps done of ``total`` planned (None: not said), for the metrics and the launcher's ETA."""
    store().report_progress(step, total)


def save_checkpoint() -> List[Dict[str, Any]]:
    """Ask every global server to checkpoint now (they need GEOMX_CHECKPOINT_DIR)."""
    return store().save_checkpoint()


def shutdown() -> None:
    """Leave the topology (also done at interpreter exit)."""
    if _store is not None:
        _store.close()


# -- values ----------------------------------------------------------------------------------------------

def _check_dtype(name: str, tensor: torch.Tensor) -> np.dtype:
    if tensor.dtype == torch.bfloat16:
        raise GeoMXError(f"{name} is bfloat16, which numpy and geomx's wire do not carry: keep the weights in "
                         "float32 (model.float()) and use compression={'type': 'fp16'} for the WAN")
    if tensor.dtype not in (torch.float32, torch.float16, torch.float64, torch.int32, torch.int64, torch.uint8):
        raise GeoMXError(f"{name} is {tensor.dtype}: geomx carries float32, float16, float64 and int32/int64/uint8")
    return np.dtype(str(tensor.dtype).replace("torch.", ""))


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", copy=False).contiguous().numpy().reshape(-1)


def _declare(name: str, tensor: torch.Tensor) -> cf.Future:
    """The INIT of ``name`` (once per process): the master worker's value is the global servers'."""
    fut = _declared.get(name)
    if fut is None:
        dtype = _check_dtype(name, tensor)
        value = _to_numpy(tensor) if is_master_worker() else None
        fut = _declared[name] = store().init(key_id(name), tensor.numel(), dtype, value)
    return fut


def _share(tensor: torch.Tensor, n: Any) -> np.ndarray:
    """``tensor / n`` as a new float32 array: the servers sum every contributor's push, so pushing each one's
    share makes the sum their mean."""
    data = _to_numpy(tensor).astype(np.float32, copy=True)
    data /= np.float32(n)
    return data


def _assign(tensor: torch.Tensor, value: np.ndarray) -> None:
    with torch.no_grad():
        tensor.copy_(torch.from_numpy(np.asarray(value).reshape(tuple(tensor.shape))))


def broadcast_parameters(params: Union[Mapping[str, torch.Tensor], Iterable[Tuple[str, torch.Tensor]]]) -> None:
    """Make the master worker's values everyone's: a ``state_dict()`` or ``named_parameters()``.

    Every tensor is a key of the global servers, named by its name; a name the optimizer already
    declared is not declared again. Waits for the values."""
    items = list(params.items()) if isinstance(params, Mapping) else list(params)
    futures = [(tensor, _declare(name, tensor)) for name, tensor in items]
    for tensor, fut in futures:
        _assign(tensor, fut.result())


# -- the optimizer -----------------------------------------------------------------------------------------

MODES = ("server", "local")


class DistributedOptimizer:
    """Wraps a ``torch.optim`` optimizer so that ``step()`` averages gradients over every worker.

    ``named_parameters``: the model's ``named_parameters()``; names are the keys on the servers, so
    every worker must build the same model. ``mode``: ``"server"`` or ``"local"`` (module docstring).
    ``compression``: ``{'type': 'fp16'|'bsc'|'mpq', ...}`` as MXNet's ``set_gradient_compression``
    (with BSC and MPQ in mode server each party's local server runs the optimizer and the WAN carries
    its sparsified steps: docs/Compression.md, "The optimizer before the codec").
    ``backward_passes_per_step``: backward passes accumulated into one step (gradient accumulation);
    the gradient is sent after the last one.
    ``schedule``: in mode server, a learning-rate schedule the servers run (geomx/servers/optimizers.py:
    ``{"type": "step", "step": 100, "factor": 0.5}`` ...); a torch LR scheduler changing the rate
    on a worker cannot reach them (refused at ``step()``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, named_parameters: Iterable[Tuple[str, torch.nn.Parameter]],
                 mode: str = "server", compression: Optional[Dict[str, Any]] = None,
                 backward_passes_per_step: int = 1, schedule: Optional[Dict[str, Any]] = None):
        if mode not in MODES:
            raise GeoMXError(f"mode={mode!r}: 'server' (the global servers run the optimizer) or 'local'")
        if backward_passes_per_step < 1:
            raise GeoMXError(f"backward_passes_per_step must be at least 1, got {backward_passes_per_step}")
        s = store()
        self.optimizer = optimizer
        # HFA and ESync average models: the optimizer runs on the workers.
        self.averaging = "esync" if s.cfg.esync.enabled else "hfa" if s.cfg.hfa.enabled else None
        if self.averaging:
            mode = "local"
        self.mode = mode
        self.backward_passes_per_step = backward_passes_per_step
        self._named = self._check_parameters(optimizer, named_parameters)
        self._params = [p for _, p in self._named]
        self._keys = [key_id(name) for name, _ in self._named]
        self._lrs = [float(group["lr"]) for group in optimizer.param_groups]
        if compression is not None:
            declared = [name for name, _ in self._named if name in _declared]
            if declared:
                # The global servers take a codec before the keys are declared (as GeoMX does).
                raise GeoMXError(f"compression= must be set before the parameters are declared ({declared[0]!r} "
                                 "already is): create the DistributedOptimizer before broadcast_parameters")
            s.set_compression(compression)  # validated everywhere; the master worker's counts
        if mode == "server":
            spec = optimizer_to_spec(optimizer, self._param_index(), schedule)
            if s.is_master_worker:
                s.set_optimizer(spec)
        elif schedule is not None:
            raise GeoMXError("schedule= is for mode='server' (the servers' optimizer); in mode='local' step a torch "
                             "LR scheduler on every worker")
        # Every worker starts from the master worker's values.
        broadcast_parameters(self._named)
        self._futures: Dict[int, cf.Future] = {}
        self._paused = False
        self._passes = [0] * len(self._params)
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(self._params)]
        self._steps = 0  # local steps (HFA, ESync)
        self._k1 = s.hfa_periods[0]  # K2 is the local servers' to count
        # ESync: local steps this round, as the global server assigned them to the party; the workers'
        # mean step count travels in ESYNC_KEY (key 0, whose replies carry the assignment).
        self._round_steps, self._assigned, self.mean_steps = 0, 1, 0.0
        if self.averaging == "esync":
            s.init(ESYNC_KEY, 1, np.float32, np.zeros(1, np.float32)).result()

    # -- checks --------------------------------------------------------------------------------------
    @staticmethod
    def _check_parameters(optimizer: torch.optim.Optimizer,
                          named_parameters: Iterable[Tuple[str, torch.nn.Parameter]]) -> List[Tuple[str, Any]]:
        named = list(named_parameters)
        seen: Dict[int, str] = {}
        for name, p in named:
            if not isinstance(name, str):
                raise GeoMXError("named_parameters must give (name, parameter) pairs, e.g. model.named_parameters()")
            if id(p) in seen:
                raise GeoMXError(f"parameters {seen[id(p)]!r} and {name!r} are one tensor (shared weights): pass "
                                 "model.named_parameters(), which names each parameter once")
            seen[id(p)] = name
            if p.dtype != torch.float32:
                raise GeoMXError(f"parameter {name!r} is {p.dtype}: geomx averages float32 parameters (bfloat16 "
                                 "and float16 models: keep float32 weights and use compression={'type': 'fp16'})")
        if len({n for n, _ in named}) != len(named):
            raise GeoMXError("two parameters have the same name")
        in_optimizer = [p for group in optimizer.param_groups for p in group["params"]]
        missing = [n for n, p in named if not any(p is q for q in in_optimizer)]
        unnamed = [q for q in in_optimizer if id(q) not in seen]
        if missing or unnamed:
            raise GeoMXError(f"the optimizer and named_parameters must hold the same parameters: "
                             f"{len(missing)} named but not in the optimizer {missing[:3]}, {len(unnamed)} in the "
                             "optimizer but not named")
        return named

    def _param_index(self) -> Dict[int, int]:
        """id(parameter) -> its key, for the spec's per-group multipliers."""
        return {id(p): k for (_, p), k in zip(self._named, self._keys)}

    # -- sending gradients as backward produces them --------------------------------------------------
    def _hook(self, index: int) -> Any:
        def hook(param: torch.Tensor) -> None:
            if self.averaging or self._paused:
                return
            self._passes[index] += 1
            if self._passes[index] == self.backward_passes_per_step:
                self._send(index)
        return hook

    def _send(self, index: int) -> None:
        p = self._params[index]
        grad = p.grad
        if grad is None:
            raise GeoMXError(f"parameter {self._named[index][0]!r} has no gradient")
        # First layers first: the next forward pass needs them first (MXNet's trainer does the same).
        self._futures[index] = store().pushpull(self._keys[index], _share(grad, size()), priority=-index)

    # -- the step ----------------------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate gradients here without sending them (DDP's ``no_sync``);
        the first backward pass after it sends the accumulated gradient."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    @property
    def param_groups(self) -> List[dict]:
        return self.optimizer.param_groups

    def step(self, closure: Any = None) -> Any:
        """Average the gradients over every worker and update the parameters (mode server: the
        servers' weights; mode local and HFA: this worker's optimizer)."""
        if closure is not None:
            raise GeoMXError("step(closure) is not supported: call backward() before step()")
        if is_master_worker():
            raise GeoMXError("the master worker does not train (if not gx.is_master_worker(): ...)")
        if self.averaging:
            return self._averaging_step()
        if not self._futures and not any(self._passes):
            raise GeoMXError("step() without backward(): no gradient was computed since the last step")
        self._check_lr()
        for index in range(len(self._params)):
            if index not in self._futures:
                if self._passes[index] == 0:
                    raise GeoMXError(f"parameter {self._named[index][0]!r} got no gradient in this step: every "
                                     "worker must send every parameter each round (freeze it by leaving it out of "
                                     "the optimizer and named_parameters)")
                raise GeoMXError(f"parameter {self._named[index][0]!r} had {self._passes[index]} backward passes, "
                                 f"backward_passes_per_step is {self.backward_passes_per_step}")
        futures, self._futures = self._futures, {}
        self._passes = [0] * len(self._params)
        for index, fut in futures.items():
            value = fut.result()
            p = self._params[index]
            if self.mode == "server":
                _assign(p, value)
            else:
                assert p.grad is not None
                _assign(p.grad, value)
        if self.mode == "local":
            return self.optimizer.step()
        return None

    def _check_lr(self) -> None:
        if self.mode != "server":
            return
        for group, lr in zip(self.optimizer.param_groups, self._lrs):
            if float(group["lr"]) != lr:
                raise GeoMXError(f"the learning rate changed on this worker ({lr} -> {group['lr']}, a torch LR "
                                 "scheduler?): in mode='server' the global servers run the optimizer; pass "
                                 "schedule={...} to DistributedOptimizer, or use mode='local'")

    def _averaging_step(self) -> Any:
        """HFA: a local step; every K1 steps the party averages its workers' models (pushpull of
        weights / workers), and every K2 of those the local servers average the parties'. ESync: the
        same with K2 = 1 and K1 = the steps the global server assigned to this party for the round."""
        result = self.optimizer.step()
        self._steps += 1
        self._round_steps += 1
        if self._round_steps >= (self._assigned if self.averaging == "esync" else self._k1):
            self._round_steps = 0
            s = store()
            futures = [(p, s.pushpull(k, _share(p, s.num_workers), priority=-i))
                       for i, (p, k) in enumerate(zip(self._params, self._keys))]
            progress = None
            if self.averaging == "esync":
                progress = s.pushpull(ESYNC_KEY, np.array([self._steps], np.float32) / np.float32(s.num_workers))
            for p, fut in futures:
                _assign(p, fut.result())
            if progress is not None:
                self.mean_steps = float(progress.result()[0])
                self._assigned = s.esync_steps()
        return result

    @property
    def esync_steps(self) -> int:
        """ESync: the local steps this worker takes in the current round (1 until the global server
        has measured every party)."""
        return self._assigned

    # -- states ---------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The wrapped optimizer's state (mode local, HFA); in mode server the states live on the
        global servers: save them with :meth:`save_server_states`."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def save_server_states(self, fname: str) -> None:
        """Mode server: the global servers' optimizer states, to an .npz file without pickles."""
        store().save_optimizer_states(fname)

    def load_server_states(self, fname: str) -> None:
        """Mode server: load states saved by :meth:`save_server_states` into the global servers."""
        store().load_optimizer_states(fname)

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
