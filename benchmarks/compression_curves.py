"""Test accuracy against rounds and against cumulative WAN bytes, with and without compression, for the
servers' Adam and momentum SGD: the plot in docs/Compression.md ("The optimizer before the codec").

Each flow runs in ``benchmarks/compression_flow_model.py``'s single-process model of 2 parties x 2
workers (the library's own codecs; bytes as framed on the wire, both directions of every party link,
warm-up included), over ``--seeds``; a curve is the median over the seeds of the accuracy at each
iteration, and of the bytes sent until then. It prints, per flow, the median iterations to 90 %, the
median MB until then and the median final accuracy, then writes the figure::

    python benchmarks/compression_curves.py --out docs/images/compression-curves.png

Takes about 13 minutes on an idle 2-core machine (11 flows x 5 seeds x 120 iterations).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import compression_flow_model as model  # noqa: E402
from summary import pyplot  # noqa: E402

SERVERS = ["--scheme", "update"]
# Before 2026-12-07 a party's workers saw the global sum only, and the codec's warm-up was DGC's.
BEFORE = ["--lookahead", "0", "--warmup-rounds", "30", "--warmup-threshold", "0.25"]
OPTIMIZERS = {"Adam, lr 0.01": ["--optimizer", "adam", "--lr", "0.01"],
              "momentum SGD (0.9), lr 0.02": ["--optimizer", "sgd-momentum", "--lr", "0.02"]}
# Per optimizer: (label, flow arguments, line style). FSA: the optimizer on the uncompressed sum.
FLOWS = {
    "Adam, lr 0.01": [
        ("FSA", ["--codec", "none", "--scheme", "grad"], "k-"),
        ("BSC 1 %", ["--codec", "bsc", *SERVERS], "C0-"),
        ("MPQ 1 %", ["--codec", "mpq", *SERVERS], "C1-"),
        ("BSC 0.1 %", ["--codec", "bsc", "--ratio", "0.001", *SERVERS], "C2-"),
        ("BSC 1 %, own residual unseen (before 2026-12-07)", ["--codec", "bsc", *SERVERS, "--lookahead", "0"],
         "C0--"),
        ("BSC 1 %, the workers' Adam", ["--codec", "bsc", "--scheme", "grad"], "C3-"),
        ("BSC 1 %, the workers' Adam (before 2026-12-07)", ["--codec", "bsc", "--scheme", "grad", *BEFORE], "C0:"),
    ],
    "momentum SGD (0.9), lr 0.02": [
        ("FSA", ["--codec", "none", "--scheme", "grad"], "k-"),
        ("BSC 1 %", ["--codec", "bsc", *SERVERS], "C0-"),
        ("MPQ 1 %", ["--codec", "mpq", *SERVERS], "C1-"),
        ("BSC 0.1 %", ["--codec", "bsc", "--ratio", "0.001", *SERVERS], "C2-"),
        ("BSC 1 %, own residual unseen (before 2026-12-07)", ["--codec", "bsc", *SERVERS, "--lookahead", "0"],
         "C0--"),
    ],
}


def median_curve(argv, seeds):
    """The flow's median accuracy and median MB sent at each iteration, and its per-seed results."""
    args = model.parse_args([*argv, "--seeds", *map(str, seeds)])
    runs = [model.run(args, seed) for seed in seeds]
    accs = [statistics.median(values) for values in zip(*(curve for curve, _ in runs))]
    megabytes = [statistics.median(values) / 1e6 for values in zip(*(sent for _, sent in runs))]
    results = [model.reached(curve, sent, args) for curve, sent in runs]
    return accs, megabytes, results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--iters", type=int, default=120)
    p.add_argument("--out", default=None, help="where to write the figure (PNG); none: print only")
    args = p.parse_args(argv)
    plt = pyplot() if args.out else None
    fig, axes = plt.subplots(len(FLOWS), 2, figsize=(12, 4.2 * len(FLOWS))) if plt else (None, None)
    for row, (optimizer, flows) in enumerate(FLOWS.items()):
        for label, flow, style in flows:
            accs, megabytes, results = median_curve([*OPTIMIZERS[optimizer], *flow, "--iters", str(args.iters)],
                                                    args.seeds)
            rounds, mb, finals = (statistics.median(values) for values in zip(*results))
            print(f"{optimizer} | {label}: 90 % at iteration {rounds} ({[r for r, _, _ in results]}), "
                  f"{mb:.2f} MB; final {finals:.4f}", flush=True)
            if axes is not None:
                iterations = range(1, len(accs) + 1)
                axes[row][0].plot(iterations, accs, style, label=label)
                axes[row][1].plot(megabytes, accs, style, label=label)
        if axes is not None:
            for ax, xlabel, by in zip(axes[row], ("round (iteration)", "WAN MB sent, both directions (log)"),
                                      ("round", "WAN bytes")):
                ax.axhline(0.9, color="grey", linewidth=0.5)
                ax.set_ylim(0.0, 1.0)
                ax.set_xlabel(xlabel)
                ax.set_ylabel("test accuracy (median of the seeds)")
                ax.set_title(f"{optimizer}: accuracy by {by}")
            axes[row][1].set_xscale("log")
            axes[row][0].legend(loc="lower right", fontsize=8)
    if fig is not None:
        fig.suptitle(f"2 parties x 2 workers, CNN on load_digits, batch 32 per worker, seeds {args.seeds} "
                     "(benchmarks/compression_flow_model.py)", fontsize=10)
        fig.tight_layout()
        fig.savefig(args.out, dpi=80)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
