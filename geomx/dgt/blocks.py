"""DGT's sender-side arithmetic: cutting a push into blocks, scoring them, choosing each block's
channel, and (mode 3) 4-bit quantization of low-priority blocks with a per-block residual.

Everything is plain numpy on one key part (the slice of a key one global server holds); the tests
compare it with an independent loop-by-loop model.
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

RELIABLE = 0  # channel 0: the reliable (TCP) channel
DROPPED = -1  # a block that is not sent at all (all zero, now and before): the receiver's zero is exact
QUANT_LEVELS = 16  # mode 3: 4 bits per element


def block_elements(block_bytes: int, dtype: np.dtype) -> int:
    """Elements per block for ``dtype`` (DGT_BLOCK_SIZE is a multiple of 4, so exact for f32/f16)."""
    return max(1, block_bytes // np.dtype(dtype).itemsize)


def num_blocks(numel: int, per_block: int) -> int:
    return max(1, -(-numel // per_block))


def block_means(data: np.ndarray, per_block: int) -> np.ndarray:
    """mean(|x|) of every block of ``data`` (the last block may be shorter), in float64."""
    n = data.size
    nb = num_blocks(n, per_block)
    full = n // per_block
    out = np.empty(nb, dtype=np.float64)
    if full:
        out[:full] = np.abs(data[:full * per_block].reshape(full, per_block)).mean(axis=1, dtype=np.float64)
    if full < nb:
        out[full] = np.abs(data[full * per_block:]).mean(dtype=np.float64)
    return out


class Scorer:
    """Each block's contribution, a moving average over the pushes of its key part:
    ``c = alpha * c_previous + (1 - alpha) * mean(|block|)`` (GeoMX's EvalMsgContribution)."""

    def __init__(self, alpha: float):
        self.alpha = alpha
        self.scores: Dict[Tuple[int, int], np.ndarray] = {}

    def update(self, part: Tuple[int, int], data: np.ndarray, per_block: int) -> np.ndarray:
        means = block_means(data, per_block)
        prev = self.scores.get(part)
        if prev is None or prev.size != means.size:
            prev = np.zeros_like(means)
        score = self.alpha * prev + (1.0 - self.alpha) * means
        self.scores[part] = score
        return score


def assign_channels(scores: np.ndarray, k: float, channels: int) -> np.ndarray:
    """The channel of every block: blocks scored exactly 0 are dropped (they are all zero now and
    were before), the top ``round(K * M)`` of the M others by score go reliably, the rest are split
    evenly in rank order over channels 1..C; the last block always goes reliably, so the receiver
    learns that the push is complete. Ties keep block order."""
    nb = scores.size
    out = np.full(nb, DROPPED, dtype=np.int64)
    out[nb - 1] = RELIABLE
    head = scores[:nb - 1]
    candidates = np.flatnonzero(head != 0)
    if candidates.size:
        ranked = candidates[np.argsort(-head[candidates], kind="stable")]
        important = int(np.floor(k * ranked.size + 0.5))
        out[ranked[:important]] = RELIABLE
        rest = ranked[important:]
        if rest.size:
            out[rest] = 1 + (np.arange(rest.size) * channels) // rest.size
    return out


def quantize(values: np.ndarray) -> Tuple[float, float, np.ndarray]:
    """4-bit uniform quantization: 16 bins between min and max; returns (lo, hi, packed nibbles),
    two elements per byte, the first in the low nibble."""
    v = np.asarray(values, dtype=np.float32)
    lo, hi = float(v.min()), float(v.max())
    if hi > lo:
        q = np.floor((v - lo) * (QUANT_LEVELS / (hi - lo))).astype(np.int64)
        q = np.clip(q, 0, QUANT_LEVELS - 1).astype(np.uint8)
    else:
        q = np.zeros(v.size, dtype=np.uint8)
    if q.size % 2:
        q = np.append(q, np.uint8(0))
    packed = (q[0::2] | (q[1::2] << 4)).astype(np.uint8)
    return lo, hi, packed


def dequantize(lo: float, hi: float, packed: np.ndarray, numel: int) -> np.ndarray:
    """The bin midpoints of :func:`quantize`'s output, as float32 (``lo`` everywhere when hi == lo)."""
    q = np.empty(packed.size * 2, dtype=np.uint8)
    q[0::2] = packed & 0x0F
    q[1::2] = packed >> 4
    q = q[:numel].astype(np.float32)
    if not hi > lo:
        return np.full(numel, lo, dtype=np.float32)
    step = np.float32((hi - lo) / QUANT_LEVELS)
    return (np.float32(lo) + (q + np.float32(0.5)) * step).astype(np.float32)


class Quantizer:
    """Mode 3: low-priority blocks go as 4 bits per element; what the quantization lost is kept per
    (key part, block) and added to that block's next quantized send (error feedback)."""

    def __init__(self) -> None:
        self.residuals: Dict[Tuple[int, int, int], np.ndarray] = {}

    def encode(self, where: Tuple[int, int, int], block: np.ndarray) -> Tuple[float, float, np.ndarray]:
        value = block.astype(np.float32)
        residual = self.residuals.get(where)
        if residual is not None and residual.size == value.size:
            value = value + residual
        lo, hi, packed = quantize(value)
        self.residuals[where] = value - dequantize(lo, hi, packed, value.size)
        return lo, hi, packed

    def flush(self, where: Tuple[int, int, int], block: np.ndarray) -> np.ndarray:
        """A block that goes exactly (reliably) this time carries what its earlier quantized sends
        lost, so nothing stays behind."""
        residual = self.residuals.pop(where, None)
        if residual is None or residual.size != block.size:
            return block
        return (block.astype(np.float32) + residual).astype(block.dtype)
