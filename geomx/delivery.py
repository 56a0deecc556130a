"""Engine-side delivery of pulled values: ``pull`` and ``pushpull`` return at once, and the reply is
written into ``out`` by an MXNet engine operation, so that every later use of ``out`` waits for it and
nothing else does.

The operation is the compiled one in csrc/_delivery.pyx, pushed with ``MXEnginePushAsyncND``: no
Python runs in MXNet's threads and no thread waits for the network. Arrays it cannot write directly
(on a GPU, or held in an MKLDNN layout after an inference pass when the pull is issued) get the reply
through a CPU staging array and an engine copy; an array that MKLDNN re-lays out after the pull was
issued is put back in the default layout by the operation itself, which overwrites it whole.
Without the compiled module (a source tree that was not built), a custom operator does the same, at
~0.8 ms of CPU per pull instead of ~0.05 ms.
"""
from __future__ import annotations

import concurrent.futures as cf
import ctypes
import itertools
import logging
import threading
from typing import Any, Dict, List, Optional

import mxnet as mx
import numpy as np
from mxnet.base import _LIB, check_call

from .errors import GeoMXError
from .kernels import load_extension

log = logging.getLogger("geomx.delivery")

_delivery = load_extension("_delivery", log, "pulls use a slower custom operator")

COMPILED: bool = _delivery is not None


class _Context(ctypes.Structure):
    """mxnet::Context: the device the operation runs on (CPU: device type 1)."""
    _fields_ = [("dev_type", ctypes.c_int), ("dev_id", ctypes.c_int)]


_CPU = _Context(1, 0)
_OP_NAME = b"geomx_deliver"

# mxnet::NDArray::InvalidateMKLDNNData(), a C++ member exported by MXNet builds with MKLDNN (1.9.1's
# wheels): the operation calls it, holding the array's write dependency, on an array that was re-laid
# out after the pull was issued (see csrc/_delivery.pyx). Builds without MKLDNN have no such layouts.
_INVALIDATE_MKLDNN = "_ZN5mxnet7NDArray20InvalidateMKLDNNDataEv"


def _address(name: str) -> int:
    try:
        return ctypes.cast(getattr(_LIB, name), ctypes.c_void_p).value or 0
    except AttributeError:
        return 0


if _delivery is not None:
    _delivery.set_api(_address("MXNDArrayToDLPack"), _address("MXNDArrayCallDLPackDeleter"),
                      _address(_INVALIDATE_MKLDNN))

# Deliveries the engine may still be using; dropped once done (checked every _SWEEP_EVERY pulls).
_outstanding: List[Any] = []
_outstanding_lock = threading.Lock()
_SWEEP_EVERY = 64


def deliver(fut: cf.Future, out: mx.nd.NDArray, priority: int = 0) -> None:
    """Write ``fut``'s array (``out.size`` elements) into ``out`` as an engine operation."""
    if _delivery is None:
        _deliver_custom(fut, out)
        return
    target = out if _directly_writable(out) else mx.nd.empty(out.shape, ctx=mx.cpu(), dtype=out.dtype)
    dtype = np.dtype(target.dtype)
    delivery = _delivery.Delivery(target, target.handle.value, target.size * dtype.itemsize)
    with _outstanding_lock:
        _outstanding.append(delivery)
        if len(_outstanding) % _SWEEP_EVERY == 0:
            _outstanding[:] = [d for d in _outstanding if not d.done]
    push_operation(delivery, writes=target, priority=priority)
    fut.add_done_callback(lambda f: _complete(delivery, f, dtype))
    if target is not out:
        target.copyto(out)  # an engine copy: converts to out's device and layout


def push_operation(slot: Any, writes: mx.nd.NDArray, reads: Optional[mx.nd.NDArray] = None,
                   priority: int = 0, name: bytes = _OP_NAME) -> None:
    """Push ``slot``'s (a ``_delivery.Delivery``) operation onto MXNet's engine, holding the write
    dependency of ``writes`` (and a read dependency of ``reads``): it completes once provided."""
    read_handles = (ctypes.c_void_p * 1)(reads.handle) if reads is not None else None
    check_call(_LIB.MXEnginePushAsyncND(
        ctypes.c_void_p(_delivery.RUN_ADDRESS), ctypes.c_void_p(slot.param), None, ctypes.byref(_CPU),
        read_handles, ctypes.c_int(0 if reads is None else 1), (ctypes.c_void_p * 1)(writes.handle),
        ctypes.c_int(1), None, ctypes.c_int(priority), name, ctypes.c_bool(False)))


def _directly_writable(out: mx.nd.NDArray) -> bool:
    """A dense CPU array in the default layout: its memory can take the reply as it is."""
    if out.context.device_type != "cpu" or out.stype != "default":
        return False
    dlpack = ctypes.c_void_p()
    if _LIB.MXNDArrayToDLPack(out.handle, ctypes.byref(dlpack)) != 0:
        return False  # an MKLDNN layout has no plain data pointer
    check_call(_LIB.MXNDArrayCallDLPackDeleter(dlpack))
    return True


def _complete(delivery: Any, fut: cf.Future, dtype: np.dtype) -> None:
    """The reply arrived (geomx's I/O thread) or was already there (the caller's thread)."""
    try:
        exc = fut.exception()
        if exc is None:
            value = fut.result()
            delivery.provide(value if value.dtype == dtype else value.astype(dtype))
            return
        message = _describe(exc)
    except Exception as err:  # noqa: BLE001 - the operation must complete whatever went wrong
        message = f"geomx: could not deliver a pulled value: {_describe(err)}"
    delivery.fail(message)


def _describe(exc: BaseException) -> str:
    """``geomx.errors.PeerDeadError: ...``: the form kvstore._failure_summary recognises."""
    kind = type(exc)
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
    return f"{name}: {exc}"


# -- fallback without the compiled module -------------------------------------------------------------

_tickets: Dict[int, cf.Future] = {}  # delivery op ticket -> the reply it waits for
_ticket_ids = itertools.count(1)
_tickets_lock = threading.Lock()
_anchors: Dict[Any, mx.nd.NDArray] = {}


class _Deliver(mx.operator.CustomOp):
    """Waits (in MXNet's custom-op thread, not the training thread) for a reply and writes it out."""

    def __init__(self, ticket: int):
        super().__init__()
        self.ticket = ticket

    def forward(self, is_train, req, in_data, out_data, aux):  # noqa: D401 - MXNet signature
        with _tickets_lock:
            fut = _tickets.pop(self.ticket)
        value = fut.result()
        out = out_data[0]
        self.assign(out, req[0], mx.nd.array(value.reshape(out.shape), ctx=out.context, dtype=out.dtype))

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):  # pragma: no cover
        raise GeoMXError("geomx delivery ops have no gradient")


@mx.operator.register("geomx_deliver")
class _DeliverProp(mx.operator.CustomOpProp):
    def __init__(self, ticket: str, shape: str, dtype: str):
        super().__init__(need_top_grad=False)
        self.ticket = int(ticket)
        self.shape = tuple(int(d) for d in shape.split(",") if d)
        self.dtype = np.dtype(dtype)

    def list_arguments(self):
        return ["anchor"]

    def list_outputs(self):
        return ["value"]

    def infer_shape(self, in_shape):
        return in_shape, [self.shape], []

    def infer_type(self, in_type):
        return in_type, [self.dtype.type], []

    def create_operator(self, ctx, shapes, dtypes):
        return _Deliver(self.ticket)


def _deliver_custom(fut: cf.Future, out: mx.nd.NDArray) -> None:
    ticket = next(_ticket_ids)
    with _tickets_lock:
        _tickets[ticket] = fut
    anchor = _anchors.get(out.context)
    if anchor is None:
        anchor = _anchors[out.context] = mx.nd.zeros((1,), ctx=out.context)
    mx.nd.Custom(anchor, op_type="geomx_deliver", ticket=str(ticket),
                 shape=",".join(str(d) for d in out.shape), dtype=np.dtype(out.dtype).name, out=out)


__all__ = ["deliver", "COMPILED"]
