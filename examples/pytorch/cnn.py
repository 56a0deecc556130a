"""The examples' CNN in PyTorch, trained over geomx's two-tier parameter server (no MXNet needed).

The same model as examples/cnn.py (two 5x5 convolutions, three dense layers, 178,762 parameters) on
scikit-learn's digits upscaled to 28x28, each worker on its own contiguous shard. Four lines make a
torch script distributed: ``gx.init()``, ``gx.DistributedOptimizer(...)``, ``gx.broadcast_parameters``
and leaving the training loop to the workers that are not the master worker.

    geomx-launch -p 2 -w 2 -- python examples/pytorch/cnn.py --slice {slice}
    geomx-launch -p 2 -w 2 -- python examples/pytorch/cnn.py --slice {slice} --compression bsc   # mode server
    geomx-launch -p 2 -w 2 --env GEOMX_SYNC_MODE=async -- python examples/pytorch/cnn.py --slice {slice}
    python examples/pytorch/cnn.py --single            # one process, no geomx (the baseline)

docs/PyTorch.md explains the modes and switches; scripts/torch/ has one launcher script per demo.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def digits(seed: int = 0, test_size: int = 300):
    """scikit-learn's 8x8 digits, upscaled (bilinear) to 1x28x28 in [0, 1], split 1497 / 300 by a fixed
    permutation: ``(x_train, y_train, x_test, y_test)``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(data.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(images, size=(28, 28), mode="bilinear", align_corners=True).clamp(0, 1)
    y = torch.from_numpy(data.target.astype(np.int64))
    order = torch.from_numpy(np.random.RandomState(seed).permutation(len(y)))
    test, train = order[:test_size], order[test_size:]
    return x[train], y[train], x[test], y[test]


def cnn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2, 2), nn.Conv2d(16, 32, 5), nn.ReLU(),
                         nn.MaxPool2d(2, 2), nn.Flatten(), nn.Linear(32 * 4 * 4, 256), nn.ReLU(),
                         nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slice", "-ds", "--data-slice-idx", type=int, default=None,
                   help="this worker's data shard (the launcher's {slice})")
    p.add_argument("--epochs", "-ep", type=int, default=5)
    p.add_argument("--cpu", action="store_true", help="accepted for scripts/lib/hips.sh; training runs on the CPU")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.01, help="Adam's learning rate (0.01, as the MXNet examples)")
    p.add_argument("--mode", choices=["server", "local"], default=None,
                   help="where the optimizer runs (default: server, with or without compression: under bsc/mpq "
                        "each party's local server steps it before the codec)")
    p.add_argument("--compression", choices=["none", "fp16", "bsc", "mpq"], default="none")
    p.add_argument("--threshold", type=float, default=0.01,
                   help="BSC's and MPQ's share of the large tensors' values sent")
    p.add_argument("--eval-every", type=int, default=10, help="iterations between test-accuracy lines")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--single", action="store_true", help="train in this process alone (no geomx)")
    args = p.parse_args(argv)
    mode = args.mode or "server"
    lr = args.lr

    x_train, y_train, x_test, y_test = digits()
    torch.manual_seed(args.seed)
    net = cnn()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    rank, size = 0, 1
    if not args.single:
        import geomx.torch as gx

        gx.init()
        compression = None
        if args.compression != "none":
            compression = {"type": args.compression}
            if args.compression in ("bsc", "mpq"):
                compression["threshold"] = args.threshold
        opt = gx.DistributedOptimizer(opt, named_parameters=net.named_parameters(), mode=mode,
                                      compression=compression)
        gx.broadcast_parameters(net.state_dict())
        if gx.is_master_worker():
            print(f"master worker: optimizer Adam lr {lr} (mode {mode}), compression {args.compression}; "
                  f"{gx.size()} training workers", flush=True)
            return 0
        rank, size = (args.slice if args.slice is not None else gx.rank()), gx.size()
    per = len(y_train) // size
    shard = np.arange(rank * per, rank * per + per)
    order = np.random.RandomState(args.seed + rank)
    start, it = time.time(), 0
    planned = args.epochs * len(range(0, per, args.batch_size))

    def report(epoch: int, acc: float) -> None:
        print(f"[Time {time.time() - start:.2f}][Epoch {epoch}][Iteration {it}] Test Acc {acc:.4f}", flush=True)
        if not args.single:  # for the worker's metrics: the launcher's status page and progress line
            gx.report_accuracy(acc)

    for epoch in range(args.epochs):
        perm = shard[order.permutation(per)]
        for b in range(0, per, args.batch_size):
            idx = torch.from_numpy(perm[b:b + args.batch_size])
            opt.zero_grad()
            F.cross_entropy(net(x_train[idx]), y_train[idx]).backward()
            opt.step()
            it += 1
            if not args.single:
                gx.report_progress(it, planned)
            if it % args.eval_every == 0:
                with torch.no_grad():
                    report(epoch, float((net(x_test).argmax(1) == y_test).float().mean()))
    with torch.no_grad():
        report(args.epochs - 1, float((net(x_test).argmax(1) == y_test).float().mean()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
