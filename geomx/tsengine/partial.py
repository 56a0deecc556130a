"""Partial sums of TSEngine's aggregation tree: what a node holds of a round before it sends it up,
and the dtype it travels in."""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from ..kernels import accumulate


def partial_dtype_ok(sent: np.dtype, key_dtype: np.dtype) -> bool:
    """A partial sum travels in the key's dtype, or in float32 for a float16 key (see Partial)."""
    return sent == key_dtype or (key_dtype == np.float16 and sent == np.float32)

@dataclasses.dataclass
class Partial:
    """A node's partial sum of one round: its own contribution, then the merged ones."""

    first: np.ndarray  # sent as it is while it is the only contribution (in the key's dtype)
    dtype: np.dtype
    acc: Optional[np.ndarray] = None
    owned: bool = False
    count: int = 1

    def add(self, data: np.ndarray, count: int) -> None:
        if self.acc is None:
            self.acc, self.owned = accumulate(None, False, self.first, self.dtype)
        self.acc, self.owned = accumulate(self.acc, self.owned, data, self.dtype)
        self.count += count

    @property
    def value(self) -> np.ndarray:
        # float16 keys: a sum of several travels in float32 so that the root rounds once, as
        # without TSEngine.
        return self.first if self.acc is None else self.acc
