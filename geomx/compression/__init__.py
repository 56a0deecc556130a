"""Gradient codecs (``none``, ``fp16``, ``bsc``, ``mpq``), their registry, wire frames and
aggregation helpers.

Typical use on a link (one codec per direction per node)::

    codec = compression.create({"type": "bsc", "threshold": 0.01})
    payload = codec.encode(key, grad)               # per-key residual kept in codec
    meta, data = compression.to_frames(payload)     # send meta as JSON, data as bytes
    ...
    payload = compression.from_frames(meta, data, size)   # validates untrusted input
    dense = codec.decode(payload, size)
    total = compression.sparse_sum([p1, p2], size)  # global server: sum the parties

See :mod:`geomx.compression.codecs` for how each codec treats each tensor on each link.
"""
from geomx.compression.aggregate import slice_payload, sparse_from_dense, sparse_sum
from geomx.compression.base import (
    DEFAULT_MOMENTUM,
    DEFAULT_SIZE_LOWER_BOUND,
    Codec,
    Payload,
    decode_payload,
)
from geomx.compression.codecs import BSCCodec, DenseCodec, FP16Codec, MPQCodec
from geomx.compression.feedback import ErrorFeedback, Residual, SampledTopK, kept_count, sample_size
from geomx.compression.frames import from_frames, to_frames
from geomx.compression.kernels import scatter_add
from geomx.compression.registry import codec_class, create, known_types, register

__all__ = [
    "BSCCodec",
    "Codec",
    "DEFAULT_MOMENTUM",
    "DEFAULT_SIZE_LOWER_BOUND",
    "DenseCodec",
    "ErrorFeedback",
    "FP16Codec",
    "MPQCodec",
    "Payload",
    "Residual",
    "SampledTopK",
    "codec_class",
    "create",
    "decode_payload",
    "from_frames",
    "kept_count",
    "known_types",
    "register",
    "sample_size",
    "slice_payload",
    "scatter_add",
    "sparse_from_dense",
    "sparse_sum",
    "to_frames",
]
