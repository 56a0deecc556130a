"""Mixed-precision (MPQ) example: small tensors as float16 on every link, large ones float32 inside
a party and BSC-sparse across the WAN.

Flow (as GeoMX's ``examples/cnn_mpq.py``): the master worker switches MPQ on with
``kv.set_gradient_compression({"type": "mpq", "threshold": r})`` before any ``kv.init`` and sets no
optimizer. Every worker initialises the keys of small parameters (fewer than the size lower bound
elements) as float16 and those of large ones as float32; each training worker pushes its mean
gradient in that dtype, pulls the aggregated gradient (the sum over all workers) into
``param.grad()`` and takes a local Adam step with ``trainer.step(num_all_workers)``, then zeroes the
gradients.

The size lower bound is ``--size-lower-bound``, else ``MXNET_KVSTORE_SIZE_LOWER_BOUND`` (default
200000); every worker must use the master worker's value, so
``scripts/cpu/run_mixed_precision.sh`` sets ``MXNET_KVSTORE_SIZE_LOWER_BOUND=1000`` on the servers
and on every worker, as the original script does. A tensor is large when ``numel >= bound`` (the
original's Python side used ``>``, its servers ``>=``)::

    python -m geomx.launch -p 2 -w 2 --env MXNET_KVSTORE_SIZE_LOWER_BOUND=1000 \\
        -- python examples/cnn_mpq.py --cpu -ds {slice} -bcr 0.01
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import cnn_bsc  # noqa: E402  (the flow shared by the compression examples)

import geomx.compression  # noqa: E402


def parse_args(argv=None):
    parser = cnn_bsc.build_compression_parser("geomx MPQ example (CNN, fp16 small tensors, BSC large ones on the WAN)",
                                              with_ratio=True)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # The workers choose each key's dtype with the bound, so it must be known here and sent.
    bound = cnn_bsc.size_lower_bound(args) or geomx.compression.DEFAULT_SIZE_LOWER_BOUND
    ratio = args.bisparse_compression_ratio

    def dtype_of(param):
        return "float32" if param.data().size >= bound else "float16"

    def describe(params):
        large = sum(1 for p in params if p.data().size >= bound)
        return (f"MPQ: ratio {ratio}, size lower bound {bound}: {large} of {len(params)} tensors "
                f"float32 (BSC on the WAN), {len(params) - large} float16.")

    return cnn_bsc.train(args, {"type": "mpq", "threshold": ratio, "size_lower_bound": bound},
                         dtype_of=dtype_of, describe=describe)


if __name__ == "__main__":
    sys.exit(main())
