"""Summing payloads from several parties, and turning a dense sum back into a sparse payload."""
from __future__ import annotations

from typing import Iterable

import numpy as np

from geomx import kernels as array_kernels
from geomx.compression import kernels
from geomx.compression.base import Payload

__all__ = ["sparse_from_dense", "sparse_sum"]


def sparse_sum(payloads: Iterable[Payload], size: int, out: np.ndarray | None = None) -> np.ndarray:
    """Sum several payloads of one tensor into a dense float32 buffer.

    Parameters
    ----------
    payloads : iterable of Payload
        Any mix of sparse, fp16 and dense payloads for a tensor of ``size`` elements.
    size : int
        Number of elements.
    out : numpy.ndarray, optional
        1-D float32 buffer of ``size`` elements to add into (it is not zeroed first);
        a zeroed one is allocated when omitted.

    Returns
    -------
    numpy.ndarray
        ``out`` (or the new buffer) plus every payload. Sparse values are added in payload
        order, then index order (``np.add.at`` semantics), in float32.

    Raises
    ------
    ValueError
        If a payload does not fit ``size`` (an index out of range, a wrong length).
    TypeError
        If ``out`` is not float32, or a dense payload cannot be cast to float32 safely.
    """
    if out is None:
        out = np.zeros(size, dtype=np.float32)
    elif out.dtype != np.float32 or out.shape != (size,):
        raise TypeError(f"out must be float32 of shape ({size},), got {out.dtype} {out.shape}")
    for p in payloads:
        if p.kind == "sparse":
            if p.indices is None:
                raise ValueError("a sparse payload needs indices")
            kernels.scatter_add(out, p.indices, p.values)
            continue
        if p.values.size != size:
            raise ValueError(f"a {p.kind} payload of {p.values.size} values does not fit a "
                             f"tensor of {size} elements")
        if p.kind == "fp16":
            array_kernels.sum_into(out, array_kernels.f16_to_f32(p.values))
        elif p.kind == "dense":
            vals = p.values
            if vals.dtype != np.float32:
                vals = vals.astype(np.float32, casting="same_kind")
            array_kernels.sum_into(out, np.ascontiguousarray(vals))
        else:
            raise ValueError(f"unknown payload kind {p.kind!r}")
    return out


def sparse_from_dense(dense: np.ndarray, max_nnz: int | None = None) -> Payload:
    """Every non-zero entry of ``dense``, as an exact sparse payload.

    The global server uses it for the downlink of BSC: the sum of the parties' sparse updates
    has at most ``sum(nnz)`` non-zeros, and sending them all loses nothing.

    Parameters
    ----------
    dense : numpy.ndarray
        1-D float32 tensor, every value finite.
    max_nnz : int, optional
        Most entries to send (lowest indices first); default all non-zeros.

    Returns
    -------
    Payload
        Sparse payload with increasing indices.

    Raises
    ------
    ValueError
        If ``dense`` holds inf/NaN.
    """
    flat = np.ascontiguousarray(dense, dtype=np.float32).reshape(-1)
    cap = flat.size if max_nnz is None else max_nnz
    tiny = float(np.nextafter(np.float32(0), np.float32(1)))
    indices, values, _ = kernels.select_above(flat, tiny, cap)
    return Payload("sparse", values, indices)


def slice_payload(payload: Payload, offset: int, numel: int) -> Payload:
    """The part of ``payload`` that covers elements ``[offset, offset + numel)``, re-based to 0.

    A key split over several global servers is encoded once, as a whole (one residual per key),
    and each server gets its slice.
    """
    if payload.kind != "sparse":
        return Payload(payload.kind, payload.values[offset:offset + numel])
    assert payload.indices is not None
    lo, hi = np.searchsorted(payload.indices, [offset, offset + numel])
    indices = (payload.indices[lo:hi] - offset).astype(payload.indices.dtype, copy=False)
    return Payload("sparse", payload.values[lo:hi], indices)
