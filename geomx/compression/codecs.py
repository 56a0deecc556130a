"""The registered codecs: ``none`` (dense), ``fp16``, ``bsc`` (bidirectional sparse) and ``mpq``
(mixed precision).

How each tensor travels (``Codec.for_tensor(numel, link)``; "large" is
``numel >= size_lower_bound``, default 200000), following geomx-behaviour.md section 5.5:

========  ===============  ===============  ==================  ==================
codec     party, large     party, small     WAN, large          WAN, small
========  ===============  ===============  ==================  ==================
none      dense            dense            dense               dense
bsc       dense (fp32)     dense (fp32)     bsc (sparse)        dense (fp32)
fp16      fp16             fp16             fp16                fp16
mpq       dense (fp32)     fp16             bsc (sparse)        fp16
========  ===============  ===============  ==================  ==================

``party`` is the worker <-> local server link, ``WAN`` the local server <-> global server link
(both directions).  ``bsc`` means :class:`~geomx.compression.feedback.SampledTopK` wrapped in
:class:`~geomx.compression.feedback.ErrorFeedback`: per key, a residual (and DGC momentum
correction when asked for) and a warm-up of the kept fraction; sent values are rounded to float16
after a power-of-two scale (``value_dtype``, the error kept in the residual); frames pack increasing
indices as 16-bit gaps and such values as float16 (:mod:`geomx.compression.frames`), no padding.

In the BSC and MPQ schemes the local server encodes its party's aggregate with a ``link="wan"``
codec; the global server sums the parties' sparse updates
(:func:`geomx.compression.sparse_sum`) and sends the sum back sparse: when the sum is the new
update itself (synchronous, no optimizer on the global server) it has at most ``parties * 2k``
non-zeros and :func:`geomx.compression.sparse_from_dense` sends them exactly; when the global
server sends something that is not sparse (e.g. MixedSync model deltas) it encodes it with a
second ``link="wan"`` codec (one per direction), whose residual keeps what is not sent yet.
Small WAN tensors travel dense (bsc) or as fp16 (mpq); the party link carries fp32 dense for
large tensors and, under mpq, fp16 for small ones.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from geomx import kernels as array_kernels
from geomx.compression.base import (
    DEFAULT_MIN_KEPT,
    DEFAULT_MOMENTUM,
    DEFAULT_SIZE_LOWER_BOUND,
    DEFAULT_VALUE_DTYPE,
    DEFAULT_WARMUP_ROUNDS,
    DEFAULT_WARMUP_THRESHOLD,
    Codec,
    Payload,
    TensorScheme,
    check_count,
    check_key,
    check_keys,
    check_momentum,
    check_ratio,
    flat_gradient,
)
from geomx.compression.feedback import ErrorFeedback, SampledTopK
from geomx.compression.registry import register

__all__ = ["BSCCodec", "DenseCodec", "FP16Codec", "MPQCodec", "to_fp16"]


def to_fp16(flat: np.ndarray) -> np.ndarray:
    """A flat float tensor as float16 (F16C kernel for float32; round to nearest even)."""
    if flat.dtype == np.float16:
        return flat
    if flat.dtype == np.float32:
        return array_kernels.f32_to_f16(flat)
    return flat.astype(np.float16)


@register("none")
class DenseCodec(Codec):
    """No compression: every tensor travels dense in its own dtype.

    Parameters: ``size_lower_bound`` (accepted for uniformity, unused).
    """

    _KEYS = ("size_lower_bound",)

    @classmethod
    def from_params(cls, params: Mapping[str, Any], *, link: str = "wan") -> DenseCodec:
        check_keys("none", params, cls._KEYS)
        return cls(size_lower_bound=params.get("size_lower_bound", DEFAULT_SIZE_LOWER_BOUND), link=link)

    def params(self) -> dict[str, Any]:
        return {"type": self.name, "size_lower_bound": self.size_lower_bound}

    def for_tensor(self, numel: int, link: str | None = None) -> TensorScheme:
        self._link(link)
        return "dense"

    def encode(self, key: int, grad: np.ndarray) -> Payload:
        check_key(key)
        return Payload("dense", flat_gradient(grad))


@register("fp16")
class FP16Codec(Codec):
    """Every tensor as float16, on every link; no residual.

    Decoding widens to float32 exactly, so a server that sums decoded payloads in float32 rounds
    only once, when (if) it converts the sum back to float16.
    Parameters: ``size_lower_bound`` (accepted for uniformity, unused).
    """

    encodes = True
    _KEYS = ("size_lower_bound",)

    @classmethod
    def from_params(cls, params: Mapping[str, Any], *, link: str = "wan") -> FP16Codec:
        check_keys("fp16", params, cls._KEYS)
        return cls(size_lower_bound=params.get("size_lower_bound", DEFAULT_SIZE_LOWER_BOUND), link=link)

    def params(self) -> dict[str, Any]:
        return {"type": self.name, "size_lower_bound": self.size_lower_bound}

    def for_tensor(self, numel: int, link: str | None = None) -> TensorScheme:
        self._link(link)
        return "fp16"

    def encode(self, key: int, grad: np.ndarray) -> Payload:
        check_key(key)
        return Payload("fp16", to_fp16(flat_gradient(grad)))


class _SparseCodec(Codec):
    """Shared parameters and large-tensor path of ``bsc`` and ``mpq``."""

    encodes = sparse = True
    _KEYS = ("threshold", "momentum", "size_lower_bound", "seed", "warmup_rounds", "warmup_threshold",
             "min_kept", "value_dtype")

    def __init__(self, threshold: float, *, momentum: float = DEFAULT_MOMENTUM,
                 size_lower_bound: int = DEFAULT_SIZE_LOWER_BOUND, seed: int = 0,
                 warmup_rounds: int = DEFAULT_WARMUP_ROUNDS,
                 warmup_threshold: float = DEFAULT_WARMUP_THRESHOLD, min_kept: int = DEFAULT_MIN_KEPT,
                 value_dtype: str = DEFAULT_VALUE_DTYPE, link: str = "wan") -> None:
        super().__init__(size_lower_bound=size_lower_bound, link=link)
        self.threshold = check_ratio("threshold", threshold)
        self.momentum = check_momentum("momentum", momentum)
        self.seed = check_count("seed", seed)
        topk = SampledTopK(self.threshold, seed=self.seed, warmup_rounds=warmup_rounds,
                           warmup_threshold=warmup_threshold, min_kept=min_kept)
        self.warmup_rounds, self.warmup_threshold = topk.warmup_rounds, topk.warmup_threshold
        self.min_kept = topk.min_kept
        self.feedback = ErrorFeedback(topk, self.momentum, value_dtype)
        self.value_dtype = self.feedback.value_dtype

    @classmethod
    def from_params(cls, params: Mapping[str, Any], *, link: str = "wan") -> _SparseCodec:
        check_keys(cls.name, params, cls._KEYS)
        if "threshold" not in params:
            raise ValueError(f"codec {cls.name!r} needs 'threshold', the fraction of entries "
                             "kept per step (0 < threshold < 1, e.g. 0.01)")
        return cls(params["threshold"],
                   momentum=params.get("momentum", DEFAULT_MOMENTUM),
                   size_lower_bound=params.get("size_lower_bound", DEFAULT_SIZE_LOWER_BOUND),
                   seed=params.get("seed", 0),
                   warmup_rounds=params.get("warmup_rounds", DEFAULT_WARMUP_ROUNDS),
                   warmup_threshold=params.get("warmup_threshold", DEFAULT_WARMUP_THRESHOLD),
                   min_kept=params.get("min_kept", DEFAULT_MIN_KEPT),
                   value_dtype=params.get("value_dtype", DEFAULT_VALUE_DTYPE), link=link)

    def params(self) -> dict[str, Any]:
        return {"type": self.name, "threshold": self.threshold, "momentum": self.momentum,
                "size_lower_bound": self.size_lower_bound, "seed": self.seed,
                "warmup_rounds": self.warmup_rounds, "warmup_threshold": self.warmup_threshold,
                "min_kept": self.min_kept, "value_dtype": self.value_dtype}

    def _small(self) -> TensorScheme:
        raise NotImplementedError

    def for_tensor(self, numel: int, link: str | None = None) -> TensorScheme:
        link = self._link(link)
        if not self.is_large(numel):
            return self._small()
        return "bsc" if link == "wan" else "dense"

    def encode(self, key: int, grad: np.ndarray) -> Payload:
        key = check_key(key)
        flat = flat_gradient(grad)
        scheme = self.for_tensor(flat.size)
        if scheme == "bsc":
            return self.feedback.encode(key, flat)
        if scheme == "fp16":
            return Payload("fp16", to_fp16(flat))
        return Payload("dense", flat)

    def reset(self, key: int | None = None) -> None:
        self.feedback.reset(key)

    def residual_norm(self) -> float:
        return self.feedback.residual_norm()


@register("bsc")
class BSCCodec(_SparseCodec):
    """Bidirectional sparse compression: large WAN tensors as top-``threshold`` sparse updates
    with error feedback (a residual; DGC momentum correction when ``momentum`` > 0) and a
    warm-up; everything else dense.

    Parameters (keys of the user's dict)
    ----------
    threshold : float
        Fraction of entries kept per step, ``0 < r < 1``; ``k = max(1, ceil(r * numel))``.
        Required.
    momentum : float, optional
        DGC momentum correction factor, ``0 <= m < 1`` (default 0: the workers' optimizer
        applies momentum; 0.9 is the original GeoMX's value, for workers stepping plain SGD).
    size_lower_bound : int, optional
        Tensors with ``numel >= size_lower_bound`` are sparsified (default 200000).
    seed : int, optional
        Seed of the threshold-estimation samples (default 0).
    warmup_rounds : int, optional
        Each key's first rounds over which the kept fraction falls geometrically from
        ``warmup_threshold`` to ``threshold`` (default 10; 0: no warm-up).
    warmup_threshold : float, optional
        Kept fraction of a key's first round, ``0 < f < 1`` (default 0.05); no warm-up when it
        is not above ``threshold``.
    min_kept : int, optional
        The fewest entries a large tensor sends a round, ``k = min(numel, max(k, min_kept))``
        (default 0: no floor; docs/Compression.md measures 128 at 0.1 %).
    value_dtype : {"float16", "float32"}, optional
        Precision of the sent values (default float16: rounded after a power-of-two scale, the
        rounding error kept in the residual; 2 bytes a value on the wire instead of 4).
    """

    def _small(self) -> TensorScheme:
        return "dense"


@register("mpq")
class MPQCodec(_SparseCodec):
    """Mixed precision: small tensors fp16 on every link; large ones fp32 dense inside a party
    and BSC-sparse on the WAN.  Same parameters as :class:`BSCCodec`."""

    def _small(self) -> TensorScheme:
        return "fp16"
