"""Distributed training with geomx.torch against torch DDP, on the same model, data shards and seeds.

Run under ``geomx-launch`` (a geomx worker: ``--slice`` is its data shard) or under
``python -m torch.distributed.run`` (``--ddp``: a DDP rank over gloo, RANK its shard). Each trains the
same small MLP for ``--steps`` steps on shard ``slice`` of a fixed random data set (the loss is the mean
over the shard, so averaged gradients are DDP's) and writes its final parameters to
``<out>/<geomx|ddp>-<slice>.npz``; the test compares the two.
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def shard(index, count):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 10, generator=g)
    y = torch.randint(0, 3, (64,), generator=g)
    return x[index::count], y[index::count]


def make_optimizer(name, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    return torch.optim.Adam(params, lr=0.01)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    p.add_argument("--mode", choices=["server", "local"], default="server")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--ddp", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    net = model()
    if args.ddp:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank, size = dist.get_rank(), dist.get_world_size()
        train = torch.nn.parallel.DistributedDataParallel(net)
        opt = make_optimizer(args.optimizer, net.parameters())
        label = "ddp"
    else:
        import geomx.torch as gx

        assert "mxnet" not in sys.modules
        gx.init()
        rank, size = gx.rank(), gx.size()
        opt = gx.DistributedOptimizer(make_optimizer(args.optimizer, net.parameters()),
                                      named_parameters=net.named_parameters(), mode=args.mode)
        gx.broadcast_parameters(net.state_dict())
        if gx.is_master_worker():
            return
        train = net
        label = "geomx"
    x, y = shard(rank, size)
    for _ in range(args.steps):
        opt.zero_grad()
        F.cross_entropy(train(x), y).backward()
        opt.step()
    np.savez(os.path.join(args.out, f"{label}-{rank}.npz"),
             **{name: t.detach().numpy() for name, t in net.state_dict().items()})
    print(f"TRAINED {label} {rank}", flush=True)
    if args.ddp:
        # Leave together, then exit at once: tearing gloo down (destroy_process_group, or the interpreter's
        # exit with gloo's threads still up) can abort in a thread's destructor ("terminate called without
        # an active exception": 1 run in ~20 here, and again in CI after destroy_process_group was added).
        # Every result is written by now; skipping the destructors loses nothing.
        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
