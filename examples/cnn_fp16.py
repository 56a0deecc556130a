"""FP16 example: the CNN trained with float16 gradients on every link.

Flow (as GeoMX's ``examples/cnn_fp16.py``): every key is initialised with the parameter cast to
float16; each training worker pushes its mean gradient as float16, pulls the aggregated float16
gradient (the sum over all workers), casts it back into ``param.grad()`` and takes a local Adam step
with ``trainer.step(num_all_workers)`` (a Gluon ``Trainer`` with ``kvstore=None``), then zeroes the
gradients. The master worker sets no optimizer; it declares ``{"type": "fp16"}`` with
``kv.set_gradient_compression`` (geomx would also carry float16 keys without it: the dtype of the
arrays decides). Unlike the original, whose servers add float16 to float16, geomx's servers sum the
float16 pushes in float32 and round the sum to float16 once; and the gradient is divided by the batch
size before the cast rather than after it. No extra environment variables are needed::

    python -m geomx.launch -p 2 -w 2 -- python examples/cnn_fp16.py --cpu -ds {slice}
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import cnn_bsc  # noqa: E402  (the flow shared by the compression examples)


def parse_args(argv=None):
    parser = cnn_bsc.build_compression_parser("geomx FP16 example (CNN, float16 gradients on every link)",
                                              with_ratio=False)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return cnn_bsc.train(args, {"type": "fp16"}, dtype_of=lambda param: "float16",
                         describe=lambda params: f"FP16: all {len(params)} tensors travel as float16.")


if __name__ == "__main__":
    sys.exit(main())
