"""Error feedback with DGC momentum correction, as a wrapper around any codec, and the sampled
top-r sparsifier that BSC wraps with it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from geomx.compression import kernels
from geomx.compression.base import (
    DEFAULT_MIN_KEPT,
    DEFAULT_MOMENTUM,
    DEFAULT_VALUE_DTYPE,
    DEFAULT_WARMUP_THRESHOLD,
    Codec,
    Payload,
    TensorScheme,
    ceil_fraction,
    check_count,
    check_key,
    check_momentum,
    check_ratio,
    check_value_dtype,
    decode_payload,
    flat_gradient,
    round_to_half,
)

__all__ = ["ErrorFeedback", "Residual", "SampledTopK", "kept_count", "sample_size", "warmup_ratio"]

SMALLEST_POSITIVE = float(np.nextafter(np.float32(0), np.float32(1)))
"""The selection threshold used in place of 0, so that zeros are never sent."""

MIN_SAMPLE = 1000
"""Smallest threshold-estimation sample (entries)."""

SAMPLE_FRACTION = 0.01
"""Threshold-estimation sample as a fraction of the tensor, at least."""

MIN_SAMPLE_KEPT = 250
"""The sample is big enough to hold this many kept entries (so it is ``>= 250 / r``)."""

OVERSHOOT = 2
"""A sampled selection sends at most ``OVERSHOOT * k`` entries."""


def kept_count(n: int, ratio: float, floor: int = DEFAULT_MIN_KEPT) -> int:
    """k, the number of entries a tensor of ``n`` elements keeps: ``max(1, ceil(ratio * n), floor)``
    and at most ``n`` (0 for an empty tensor)."""
    return 0 if n == 0 else min(n, max(1, ceil_fraction(ratio, n), floor))


def sample_size(n: int, ratio: float) -> int:
    """Entries sampled to estimate the threshold: ``max(1000, ceil(n / 100), ceil(250 / ratio))``.

    The estimate then rests on 250 kept sample entries or more, so the number of entries it
    selects is k within about ``1 / sqrt(250)``, i.e. 6% (one standard deviation; about 3% at
    10M elements and r = 0.01, where the sample holds 1000 kept entries).  When this reaches
    ``n`` the threshold is computed exactly from the whole tensor instead.
    """
    return max(MIN_SAMPLE, ceil_fraction(SAMPLE_FRACTION, n), ceil_fraction(1.0 / ratio, MIN_SAMPLE_KEPT))


def warmup_ratio(ratio: float, rnd: int, rounds: int, start: float) -> float:
    """The kept fraction of a key's round ``rnd`` (0 for its first encode) under warm-up.

    It falls geometrically from ``start`` at round 0 to ``ratio`` at round ``rounds`` and stays
    there: ``start * (ratio / start) ** (rnd / rounds)``.  No warm-up when ``rounds`` is 0 or
    ``start <= ratio``.  DGC's warm-up: early gradients change fast and every entry of a large
    tensor would otherwise wait about ``1 / ratio`` rounds for its first turn, which costs
    optimizers that move every coordinate at once (Adam) most (docs/Compression.md).
    """
    if rnd >= rounds or start <= ratio:
        return ratio
    return start * (ratio / start) ** (rnd / rounds)


def sample_seed(seed: int, key: int, step: int) -> int:
    """The splitmix64 seed for the ``step``-th sample of ``key`` in a codec seeded with ``seed``.

    Derived with :class:`numpy.random.SeedSequence`, so keys and steps get independent positions
    and the order in which keys are encoded does not matter.
    """
    return int(np.random.SeedSequence([seed, key, step]).generate_state(1, dtype=np.uint64)[0])


class SampledTopK(Codec):
    """Stateless-in-values sparsifier: sends about the top ``ratio`` fraction of entries by magnitude.

    Algorithm, for a tensor ``v`` of ``n`` elements and ``k = kept_count(n, ratio, min_kept)``,
    where ``ratio`` is the key's :func:`warmup_ratio` for this round (``threshold`` once the
    ``warmup_rounds`` first rounds of the key are over; no warm-up by default); when the floor
    ``min_kept`` raises k, ``ratio`` is ``k / n`` from there on:

    1. If ``k == n``, every non-zero entry is sent (exact: decoding gives ``v`` back).
    2. Else, with ``s = sample_size(n, ratio)``: when ``s >= n`` the threshold ``t`` is the exact
       k-th largest ``|v|`` and at most ``k`` entries are sent (ties go to the lower index);
       otherwise ``t`` is the ``ceil(ratio * s)``-th largest of ``s`` magnitudes read in runs
       of 8 consecutive entries at pseudo-random positions
       (:func:`geomx.compression.kernels.sample_abs`: seeded per codec, key and step, every
       entry equally likely, never out of bounds), and at most ``2k`` entries are sent.
    3. One pass (:func:`geomx.compression.kernels.select_above`) sends the entries with
       ``|v| >= max(t, smallest positive float)`` in index order, up to that cap.

    So zeros never travel (an all-zero tensor encodes to an empty payload), and the number sent
    is ``min(cap, #{|v| >= t})``: near k for a continuous distribution (the sample has at least
    250 kept entries, so a few percent off), fewer when the tensor has fewer
    non-zeros, and at most the cap when many entries tie at the threshold (the lowest indices
    win; the rest wait in the residual under :class:`ErrorFeedback`).
    """

    name = "topk"

    def __init__(self, ratio: float, *, seed: int = 0, warmup_rounds: int = 0,
                 warmup_threshold: float = DEFAULT_WARMUP_THRESHOLD, min_kept: int = DEFAULT_MIN_KEPT) -> None:
        super().__init__(size_lower_bound=0)
        self.ratio = check_ratio("threshold", ratio)
        self.min_kept = check_count("min_kept", min_kept)
        self.seed = check_count("seed", seed)
        self.warmup_rounds = check_count("warmup_rounds", warmup_rounds)
        self.warmup_threshold = check_ratio("warmup_threshold", warmup_threshold)
        self._steps: dict[int, int] = {}  # threshold samples drawn per key
        self._rounds: dict[int, int] = {}  # encodes per key (the warm-up clock)

    @classmethod
    def from_params(cls, params: Mapping[str, Any], *, link: str = "wan") -> SampledTopK:
        return cls(params["threshold"], seed=params.get("seed", 0),
                   warmup_rounds=params.get("warmup_rounds", 0),
                   warmup_threshold=params.get("warmup_threshold", DEFAULT_WARMUP_THRESHOLD),
                   min_kept=params.get("min_kept", DEFAULT_MIN_KEPT))

    def params(self) -> dict[str, Any]:
        return {"type": self.name, "threshold": self.ratio, "seed": self.seed,
                "warmup_rounds": self.warmup_rounds, "warmup_threshold": self.warmup_threshold,
                "min_kept": self.min_kept}

    def for_tensor(self, numel: int, link: str | None = None) -> TensorScheme:
        return "bsc"

    def threshold_and_cap(self, key: int, v: np.ndarray) -> tuple[float, int]:
        """The selection threshold and cap for ``v`` (advances the key's warm-up clock and
        sample stream)."""
        n = v.size
        rnd = self._rounds.get(key, 0)
        self._rounds[key] = rnd + 1
        ratio = warmup_ratio(self.ratio, rnd, self.warmup_rounds, self.warmup_threshold)
        k = kept_count(n, ratio, self.min_kept)
        if k > kept_count(n, ratio):  # the floor decides: sample (and cap) as for that fraction
            ratio = k / n
        if k >= n:
            return SMALLEST_POSITIVE, n
        s = sample_size(n, ratio)
        if s >= n:
            mags = np.abs(v)
            t = float(np.partition(mags, n - k)[n - k])
            cap = k
        else:
            step = self._steps.get(key, 0)
            self._steps[key] = step + 1
            mags = kernels.sample_abs(v, s, sample_seed(self.seed, key, step))
            ks = min(s, max(1, ceil_fraction(ratio, s)))
            t = float(np.partition(mags, s - ks)[s - ks])
            cap = min(n, OVERSHOOT * k)
        return max(t, SMALLEST_POSITIVE), cap

    def encode(self, key: int, grad: np.ndarray) -> Payload:
        key = check_key(key)
        v = flat_gradient(grad)
        if v.dtype != np.float32:
            v = v.astype(np.float32)
        if v.size == 0:
            return Payload("sparse", np.empty(0, np.float32), np.empty(0, np.int32))
        thr, cap = self.threshold_and_cap(key, v)
        indices, values, _ = kernels.select_above(v, thr, cap)
        return Payload("sparse", values, indices)

    def reset(self, key: int | None = None) -> None:
        if key is None:
            self._steps.clear()
            self._rounds.clear()
        else:
            self._steps.pop(key, None)
            self._rounds.pop(key, None)


@dataclass
class Residual:
    """Per-key error-feedback state: velocity ``u`` and accumulated velocity ``v`` (float32)."""

    u: np.ndarray
    v: np.ndarray
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = int(self.v.size)

    @classmethod
    def zeros(cls, n: int) -> Residual:
        return cls(np.zeros(n, np.float32), np.zeros(n, np.float32))


class ErrorFeedback:
    """Error feedback with DGC momentum correction around any codec.

    Per key, with momentum factor ``m``::

        u = m*u + g          # momentum correction
        v = v + u            # accumulation (v is the residual plus what is new)
        p = inner.encode(key, v)
        p = half(p)          # value_dtype float16: values rounded to float16 after a power-of-two scale
        v = v - decode(p)    # what was sent leaves the residual (sparse: v[sel] becomes 0, or the
                             # rounding error of its value)
        u[sent] = 0          # momentum factor masking (dense payloads: all of u)

    With ``m = 0`` this is plain error feedback (``v`` accumulates ``g``).  The state takes
    ``8 * numel`` bytes per key.

    Parameters
    ----------
    inner : Codec
        The lossy codec whose error is fed back (e.g. :class:`SampledTopK`).
    momentum : float, optional
        Momentum correction factor, ``0 <= m < 1`` (default 0: plain error feedback, see
        :data:`geomx.compression.base.DEFAULT_MOMENTUM`).
    value_dtype : {"float16", "float32"}, optional
        Precision of a sparse payload's values (default float16,
        :data:`geomx.compression.base.DEFAULT_VALUE_DTYPE`): float16 halves their bytes on the wire and
        leaves the rounding error in ``v``.
    """

    def __init__(self, inner: Codec, momentum: float = DEFAULT_MOMENTUM,
                 value_dtype: str = DEFAULT_VALUE_DTYPE) -> None:
        self.inner = inner
        self.momentum = check_momentum("momentum", momentum)
        self.value_dtype = check_value_dtype(value_dtype)
        self._state: dict[int, Residual] = {}

    def state(self, key: int) -> Residual | None:
        """The residual state of ``key`` (None before its first encode)."""
        return self._state.get(key)

    def residual_norm(self) -> float:
        """The L2 norm of every key's residual ``v`` together: what the codec still owes the receiver."""
        return float(np.sqrt(sum(float(np.dot(st.v, st.v)) for st in list(self._state.values()))))

    def encode(self, key: int, grad: np.ndarray) -> Payload:
        """Encode ``grad`` plus the key's residual; see the class docstring.

        Raises
        ------
        ValueError
            If ``grad`` holds inf/NaN (the state is left untouched), if the accumulated state
            overflows to inf (the key's state is then reset), or if the key's size changed.
        """
        key = check_key(key)
        g = flat_gradient(grad)
        if g.dtype != np.float32:
            g = g.astype(np.float32)
        st = self._state.get(key)
        if st is None:
            st = Residual.zeros(g.size)
        elif st.size != g.size:
            raise ValueError(f"key {key} had {st.size} elements and now has {g.size}; "
                             "reset() the codec before reusing a key for another tensor")
        kernels.dgc_accumulate(st.u, st.v, g, self.momentum)
        self._state[key] = st
        try:
            payload = self.inner.encode(key, st.v)
        except ValueError as exc:
            self.reset(key)
            raise ValueError(f"key {key}: the accumulated gradient overflowed float32 ({exc}); "
                             "its residual state was reset") from exc
        if payload.kind == "sparse":
            assert payload.indices is not None
            if self.value_dtype == "float16" and payload.nnz:
                payload = Payload("sparse", round_to_half(payload.values), payload.indices)
            kernels.scatter_add(st.v, payload.indices, -payload.values)
            st.u[payload.indices] = 0.0
        else:
            st.v -= decode_payload(payload, g.size)
            st.u.fill(0.0)
        return payload

    def reset(self, key: int | None = None) -> None:
        """Forget the residual of ``key`` (or of every key)."""
        if key is None:
            self._state.clear()
        else:
            self._state.pop(key, None)
        self.inner.reset(key)
