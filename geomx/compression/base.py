"""The codec interface: payloads, the Codec base class, and parameter validation."""
from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Mapping

import numpy as np

from geomx import kernels as array_kernels
from geomx.compression import kernels

__all__ = [
    "DEFAULT_MIN_KEPT",
    "DEFAULT_MOMENTUM",
    "DEFAULT_VALUE_DTYPE",
    "DEFAULT_SIZE_LOWER_BOUND",
    "DEFAULT_WARMUP_ROUNDS",
    "DEFAULT_WARMUP_THRESHOLD",
    "LINKS",
    "Codec",
    "Payload",
    "VALUE_DTYPES",
    "decode_payload",
    "flat_gradient",
    "half_scale",
]

DEFAULT_SIZE_LOWER_BOUND = 200_000
"""Tensors with ``numel >= size_lower_bound`` are large (MXNET_KVSTORE_SIZE_LOWER_BOUND)."""

DEFAULT_MOMENTUM = 0.0
"""DGC momentum correction factor. 0 (plain error feedback): momentum correction moves the
momentum of momentum SGD to the sender and assumes the receiver then steps without momentum;
the workers' own optimizers (Adam's first moment, SGD with momentum) would apply momentum a
second time, which stalls Adam and makes SGD with momentum diverge (docs/Compression.md,
"Why local Adam stalled").  The original GeoMX hard-coded 0.9; pass ``momentum`` to get it."""

DEFAULT_WARMUP_ROUNDS = 10
"""Rounds per key over which the kept fraction falls from ``warmup_threshold`` to ``threshold``."""

DEFAULT_WARMUP_THRESHOLD = 0.05
"""Kept fraction of a key's first round. Every party seeing what its own codec holds back (the servers'
optimizer steps, or the workers' pulled gradient sum) is what lets a short warm-up serve every flow: with
the workers' own Adam (cnn_bsc.py), 10 rounds from 0.05 reached 90 % in 28 (BSC) and 27 (MPQ) rounds
against 26 and 26 with DGC's 30 rounds from 0.25, and spend about a quarter of the bytes
(docs/Compression.md)."""

DEFAULT_MIN_KEPT = 0
"""The fewest entries a large tensor sends per round (``min_kept``; 0: just the kept fraction)."""

DEFAULT_VALUE_DTYPE = "float16"
"""The precision of the values a sparse codec sends: ``float16`` rounds each selected value to float16
after a per-payload power-of-two scale (the rounding error stays in the residual, so nothing is lost
over rounds) and the frame carries 2 bytes per value instead of 4; ``float32`` sends them as they are."""

VALUE_DTYPES = ("float16", "float32")

LINKS = ("wan", "party")
"""The links a codec can serve: local server <-> global server, or worker <-> local server."""

PayloadKind = Literal["dense", "sparse", "fp16"]
TensorScheme = Literal["dense", "fp16", "bsc"]


@dataclass(frozen=True)
class Payload:
    """One encoded tensor.

    Attributes
    ----------
    kind : {"dense", "sparse", "fp16"}
        ``dense``: ``values`` is the whole tensor, in its own dtype. ``fp16``: the whole tensor
        as float16. ``sparse``: the tensor is zero except at ``indices``, where it holds
        ``values`` (float32); duplicate indices add up.
    values : numpy.ndarray
        1-D values.
    indices : numpy.ndarray or None
        1-D int32/int64 positions for ``sparse`` (increasing when produced by an encoder, but a
        decoder accepts any order); None otherwise.
    """

    kind: PayloadKind
    values: np.ndarray
    indices: np.ndarray | None = None

    @property
    def nnz(self) -> int:
        """Number of values carried."""
        return int(self.values.size)

    @property
    def nbytes(self) -> int:
        """Bytes of values and indices in memory; :func:`~geomx.compression.to_frames` packs a sparse
        payload smaller when it can (gap16 indices, float16 values), so its frame may be up to half."""
        return int(self.values.nbytes + (0 if self.indices is None else self.indices.nbytes))


def flat_gradient(grad: np.ndarray) -> np.ndarray:
    """``grad`` as a 1-D C-contiguous array (a view when it already is one).

    Parameters
    ----------
    grad : numpy.ndarray
        Tensor of any shape.

    Returns
    -------
    numpy.ndarray
        The flat tensor, in native byte order.

    Raises
    ------
    TypeError
        If ``grad`` is not a numpy array of floats.
    """
    if not isinstance(grad, np.ndarray):
        raise TypeError(f"grad must be a numpy.ndarray, got {type(grad).__name__}")
    if grad.dtype.kind != "f":
        raise TypeError(f"grad must hold floats, got {grad.dtype}")
    flat = np.ascontiguousarray(grad).reshape(-1)
    if not flat.dtype.isnative:
        flat = flat.astype(flat.dtype.newbyteorder("="))
    return flat


HALF_SCALE_LIMIT = 120
"""Largest ``|scale|`` of :func:`half_scale` (and accepted in a frame): ``2**scale`` and its inverse
stay normal float32 numbers."""


def half_scale(values: np.ndarray, lossless: bool = True) -> tuple[int, np.ndarray] | None:
    """``(scale, halves)`` with ``halves = float16(values * 2**scale)``, the scale a power of two that
    brings the largest magnitude into ``[2**14, 2**15)`` (float16's top binade, so small values keep
    as many bits as float16 allows); None when there is no finite non-zero value, or (``lossless``)
    when ``halves * 2**-scale`` is not exactly ``values``.

    Power-of-two scaling is exact in float32, so a value that went through this once (rounded, with
    ``lossless=False``) passes the lossless check when it is framed (:func:`geomx.compression.to_frames`).
    """
    flat = np.asarray(values, dtype=np.float32).reshape(-1)
    if flat.size == 0:
        return None
    top = float(np.max(np.abs(flat)))
    if not np.isfinite(top) or top == 0.0:
        return None
    scale = 15 - int(np.frexp(top)[1])  # top = f * 2**e, f in [0.5, 1): top * 2**(15 - e) in [2**14, 2**15)
    if abs(scale) > HALF_SCALE_LIMIT:
        return None
    halves = (flat * np.float32(2.0 ** scale)).astype(np.float16)
    if lossless and not np.array_equal(halves.astype(np.float32) * np.float32(2.0 ** -scale), flat):
        return None
    return scale, halves


def round_to_half(values: np.ndarray) -> np.ndarray:
    """``values`` (float32) rounded to what :func:`half_scale` can frame in 2 bytes each: a new array;
    ``values`` itself when there is nothing to round."""
    found = half_scale(values, lossless=False)
    if found is None:
        return values
    scale, halves = found
    return halves.astype(np.float32) * np.float32(2.0 ** -scale)


def decode_payload(payload: Payload, size: int) -> np.ndarray:
    """The dense tensor a payload stands for.

    Parameters
    ----------
    payload : Payload
        An encoded tensor (from an encoder or :func:`geomx.compression.from_frames`).
    size : int
        Number of elements of the tensor.

    Returns
    -------
    numpy.ndarray
        1-D array of ``size`` elements: float32 for ``sparse`` and ``fp16`` payloads (float16
        widens exactly, so sums over it lose nothing more); for ``dense``, ``payload.values``
        itself in its own dtype (not a copy).

    Raises
    ------
    ValueError
        If the payload does not fit ``size`` (wrong length, an index out of range) or has an
        unknown kind.
    """
    if payload.kind == "sparse":
        if payload.indices is None:
            raise ValueError("a sparse payload needs indices")
        out = np.zeros(size, dtype=np.float32)
        kernels.scatter_add(out, payload.indices, payload.values)
        return out
    if payload.values.size != size:
        raise ValueError(f"a {payload.kind} payload of {payload.values.size} values "
                         f"cannot stand for a tensor of {size} elements")
    if payload.kind == "fp16":
        return array_kernels.f16_to_f32(payload.values)
    if payload.kind == "dense":
        return payload.values
    raise ValueError(f"unknown payload kind {payload.kind!r}")


# ---------------------------------------------------------------------------------------------
# Parameter validation (shared by the codecs' from_params)


def check_ratio(name: str, value: Any) -> float:
    """``value`` as a float in (0, 1), or ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r} "
                         f"({type(value).__name__})")
    r = float(value)
    if not (0.0 < r < 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in (0, 1) (the fraction of entries kept), got {value!r}")
    return r


def check_value_dtype(value: Any) -> str:
    """``value`` as one of :data:`VALUE_DTYPES`, or ValueError."""
    if value not in VALUE_DTYPES:
        raise ValueError(f"value_dtype must be one of {list(VALUE_DTYPES)}, got {value!r}")
    return str(value)


def check_momentum(name: str, value: Any) -> float:
    """``value`` as a float in [0, 1), or ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r} "
                         f"({type(value).__name__})")
    m = float(value)
    if not (0.0 <= m < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return m


def check_count(name: str, value: Any) -> int:
    """``value`` as an int >= 0, or ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def check_keys(codec: str, params: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    """ValueError for any key of ``params`` outside ``allowed``."""
    extra = sorted(str(k) for k in params if k not in allowed)
    if extra:
        known = ", ".join(repr(k) for k in allowed) or "none"
        raise ValueError(f"unknown parameter(s) {', '.join(map(repr, extra))} for codec "
                         f"{codec!r}; it takes: {known}")


def check_key(key: Any) -> int:
    """``key`` as an int >= 0, or TypeError/ValueError."""
    if isinstance(key, bool) or not isinstance(key, numbers.Integral):
        raise TypeError(f"key must be an int, got {type(key).__name__}")
    if key < 0:
        raise ValueError(f"key must be >= 0, got {key}")
    return int(key)


class Codec(ABC):
    """A gradient codec for one direction of one link on one node.

    A codec encodes each key's tensor into a :class:`Payload` and keeps whatever per-key state
    it needs (residuals, RNG streams) inside itself; make one instance per link direction per
    node.  ``encode`` is not safe to call concurrently for the same key; different keys may be
    encoded from different threads (the kernels release the GIL).

    Subclasses set ``name`` (the registry name), implement :meth:`params`, :meth:`from_params`,
    :meth:`for_tensor` and :meth:`encode`, and inherit :meth:`decode`.
    """

    name: ClassVar[str] = ""
    # What the codec does on the WAN, declared for the servers' rules of what combines with what
    # (geomx/servers/codec_rules.py), which read these and never a codec's name:
    encodes: ClassVar[bool] = False
    """A tensor may leave in another form than its own dtype, dense (features that move raw dense sums,
    DGT's blocks, cannot carry it)."""
    sparse: ClassVar[bool] = False
    """Large tensors travel as sparse updates with a residual: a sum of them is sparse, and what is not
    sent yet waits (an optimizer must run in front of the codec, not behind it)."""

    def __init__(self, *, size_lower_bound: int = DEFAULT_SIZE_LOWER_BOUND, link: str = "wan"):
        self.size_lower_bound = check_count("size_lower_bound", size_lower_bound)
        if link not in LINKS:
            raise ValueError(f"link must be one of {LINKS}, got {link!r}")
        self.link = link

    # -- description ---------------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def from_params(cls, params: Mapping[str, Any], *, link: str = "wan") -> Codec:
        """Build the codec from user parameters (without ``type``), validating them."""

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """JSON-serializable parameters, ``type`` included; ``create(codec.params())`` rebuilds it."""

    def is_large(self, numel: int) -> bool:
        """Whether a tensor of ``numel`` elements is large (``numel >= size_lower_bound``)."""
        return numel >= self.size_lower_bound

    @abstractmethod
    def for_tensor(self, numel: int, link: str | None = None) -> TensorScheme:
        """How a tensor of ``numel`` elements travels on ``link`` (default: this codec's link).

        Returns
        -------
        {"dense", "fp16", "bsc"}
            ``dense``: as is, in its own dtype; ``fp16``: as float16; ``bsc``: sparse top-r with
            error feedback.
        """

    def _link(self, link: str | None) -> str:
        if link is None:
            return self.link
        if link not in LINKS:
            raise ValueError(f"link must be one of {LINKS}, got {link!r}")
        return link

    # -- data ----------------------------------------------------------------------------------

    @abstractmethod
    def encode(self, key: int, grad: np.ndarray) -> Payload:
        """Encode ``grad`` (any shape; flattened) for ``key``, updating the key's state.

        Parameters
        ----------
        key : int
            Parameter key (>= 0); state is kept per key.
        grad : numpy.ndarray
            The tensor to send. Dense payloads may share memory with it.

        Returns
        -------
        Payload
        """

    def decode(self, payload: Payload, size: int) -> np.ndarray:
        """The dense tensor (``size`` elements) that ``payload`` stands for; see
        :func:`decode_payload`."""
        return decode_payload(payload, size)

    def residual_norm(self) -> float | None:
        """The L2 norm of what error feedback holds back (None: this codec keeps no residual)."""
        return None

    def reset(self, key: int | None = None) -> None:  # noqa: B027 - a no-op default on purpose
        """Forget the state of ``key`` (or of every key); stateless codecs do nothing."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items() if k != "type")
        return f"{type(self).__name__}({args}, link={self.link!r})"


def ceil_fraction(r: float, n: int) -> int:
    """``ceil(r * n)`` without float noise: 0.01 * 100 is 1, not 2.

    A product within 1e-9 (relative) of an integer counts as that integer.
    """
    x = r * n
    nearest = round(x)
    if abs(x - nearest) <= 1e-9 * max(1.0, x):
        return int(nearest)
    return int(math.ceil(x))
