"""A ``torch.optim`` optimizer as the framework-neutral spec the global servers run
(geomx/servers/optimizers.py, rule ``torch``): its name, the hyper-parameters of its first parameter
group, and per key the learning-rate and weight-decay multipliers of the other groups."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ..errors import GeoMXError
from ..servers.optimizers import SUPPORTED, OptimizerSpecError, normalize_spec

# Exact classes only: a subclass may change the update rule the servers would then not run.
_NAMES = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adamw",
          torch.optim.RMSprop: "rmsprop", torch.optim.Adagrad: "adagrad"}
# Group entries that are not hyper-parameters of the rule.
_NOT_HYPER = {"params", "lr", "initial_lr", "name"}


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def optimizer_to_spec(optimizer: torch.optim.Optimizer, key_of: Dict[int, int],
                      schedule: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The spec of ``optimizer``; ``key_of`` maps ``id(parameter)`` to its key. Groups may differ in
    ``lr`` and ``weight_decay`` (sent as per-key multipliers of the first group's), nothing else."""
    name = _NAMES.get(type(optimizer))
    if name is None:
        raise GeoMXError(f"the global servers run torch.optim's {', '.join(SUPPORTED)} (exact classes), not "
                         f"{type(optimizer).__name__}: use mode='local' (each worker steps its own optimizer on "
                         "the averaged gradient)")
    groups = optimizer.param_groups
    first = groups[0]

    def hyper(group: Dict[str, Any]) -> Dict[str, Any]:
        out = {k: _plain(v) for k, v in group.items() if k not in _NOT_HYPER}
        if name == "adamw" and out.get("decoupled_weight_decay", True):
            out.pop("decoupled_weight_decay", None)  # what AdamW is (torch >= 2.6 records it in the group)
        return out

    params = hyper(first)
    lr = float(_plain(first["lr"]))
    wd = float(params.get("weight_decay", 0.0))
    lr_mult: Dict[str, float] = {}
    wd_mult: Dict[str, float] = {}
    for i, group in enumerate(groups[1:], start=1):
        other = hyper(group)
        differ = sorted(k for k in set(params) | set(other)
                        if k != "weight_decay" and params.get(k) != other.get(k))
        if differ:
            raise GeoMXError(f"parameter group {i} differs from group 0 in {', '.join(differ)}: the servers run one "
                             "optimizer (groups may differ in lr and weight_decay only); use mode='local'")
        group_lr, group_wd = float(_plain(group["lr"])), float(other.get("weight_decay", 0.0))
        if (lr == 0 and group_lr != 0) or (wd == 0 and group_wd != 0):
            raise GeoMXError(f"parameter group {i}: its lr/weight_decay cannot be a multiple of group 0's zero; "
                             "put a group with non-zero values first")
        for p in group["params"]:
            key = str(key_of[id(p)])
            if group_lr != lr:
                lr_mult[key] = group_lr / lr
            if group_wd != wd:
                wd_mult[key] = group_wd / wd
    spec = {"name": name, "rule": "torch", "lr": lr, "params": params, "lr_mult": lr_mult, "wd_mult": wd_mult,
            "schedule": schedule}
    try:
        return normalize_spec(spec)
    except OptimizerSpecError as exc:
        raise GeoMXError(f"{exc}") from None
