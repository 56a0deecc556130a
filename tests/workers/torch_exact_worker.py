"""The exact-oracle worker for the PyTorch front end (geomx.torch), with no MXNet.

Model: named parameters of SHAPES, the loss ``sum(p * c)``, so backward gives every parameter the
gradient ``c``: in round t worker w (its data slice) has ``c = (w + 1) * (t + 1) * base_k``, integer
valued. Gradients are averaged over the N workers (each sends ``c / N``; N a power of two keeps every
value exact in float32), so with SGD lr=1 (on the servers, mode server, or on each worker, mode local)
the weights after round t are ``init - S / N * base_k * sum(1..t+1)``, S = sum of (w + 1): checked with
zero tolerance after every round. With Adam (mode server) the oracle is torch.optim.Adam over the same
averaged gradients in this process (<= 1e-6 relative: numpy's float32 against torch's kernels). With
``--sync async`` (MixedSync) only the master worker's final pull is checked (SGD lr=1 subtracts exact
values in any order). Prints ``ROUND <t> OK`` after each round and ``EXACT OK`` at the end.
"""
import argparse
import sys
import time

import numpy as np
import torch

import geomx.torch as gx

SHAPES = {"a.weight": (3, 4), "a.bias": (7,), "big": (1000, 300), "c": (1,)}


def base(i, name):
    n = int(np.prod(SHAPES[name]))
    return torch.from_numpy(((np.arange(n) % 13) - 6).astype(np.float32).reshape(SHAPES[name]) + i)


def init_value(name):
    return torch.from_numpy((np.arange(int(np.prod(SHAPES[name]))) % 101).astype(np.float32).reshape(SHAPES[name]))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--mode", choices=["server", "local"], default="server")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    p.add_argument("--sync", choices=["sync", "async"], default="sync")
    p.add_argument("--compression", default=None, help="fp16: the averaged gradients are float16-rounded")
    p.add_argument("--sleep", type=float, default=0.0, help="seconds after each round (a test acts meanwhile)")
    p.add_argument("--fail-rank", type=int, default=-1, help="this worker misbehaves after its first round")
    p.add_argument("--failure", choices=["raise", "no-backward", "unused", "late-compression"], default="raise",
                   help="how: raise an exception, call step() without backward(), leave a parameter without a "
                        "gradient, or (at once) declare the parameters before setting compression")
    args = p.parse_args()

    assert "mxnet" not in sys.modules
    gx.init(sync=args.sync)
    torch.manual_seed(1234 + gx.rank())  # different on every worker: the master's values must win
    params = {name: torch.nn.Parameter(torch.randn(shape)) for name, shape in SHAPES.items()}
    if gx.is_master_worker():
        for name, param in params.items():
            param.data.copy_(init_value(name))
    make = {"sgd": lambda ps: torch.optim.SGD(ps, lr=1.0),
            "adam": lambda ps: torch.optim.Adam(ps, lr=0.01)}[args.optimizer]
    compression = {"type": args.compression} if args.compression else None
    if gx.rank() == args.fail_rank and args.failure == "late-compression" and not gx.is_master_worker():
        gx.broadcast_parameters(params)
        compression = {"type": "fp16"}
    opt = gx.DistributedOptimizer(make(list(params.values())), named_parameters=params.items(), mode=args.mode,
                                  compression=compression)
    gx.broadcast_parameters(params)
    n, world = gx.size(), sum(range(1, gx.size() + 1))
    if args.sync != "async":
        # Under MixedSync a party does not wait for the others: one that starts late pulls a model that the
        # others' first rounds may have moved already (the final sum below holds in any order).
        for name, param in params.items():
            assert torch.equal(param.data, init_value(name)), f"{name}: not the master worker's initial value"
    print(f"RANK {gx.rank()} of {n} party {gx.party()} curve {gx.store().cfg.curve is not None}", flush=True)

    if gx.is_master_worker():
        if args.sync == "async":
            gx.barrier()  # after every party's last round
            # A party's last aggregate may still be on its way when the barrier completes (its workers
            # were answered by their local server): poll the global servers for a bounded time.
            total = sum(range(1, args.rounds + 1))
            want = {name: (init_value(name) - base(i, name) * (total * world / n)).numpy().reshape(-1)
                    for i, name in enumerate(SHAPES)}
            deadline = time.monotonic() + 30
            while True:
                got = {name: gx.store().pull(gx.key_id(name)).result() for name in SHAPES}
                if all(np.array_equal(got[name], want[name]) for name in SHAPES):
                    break
                if time.monotonic() > deadline:
                    print(f"MISMATCH final: {[np.abs(got[m] - want[m]).max() for m in SHAPES]}", flush=True)
                    sys.exit(1)
                time.sleep(0.1)
        print("EXACT OK", flush=True)
        return

    cfg = gx.store().cfg
    if cfg.esync.enabled:
        return esync_run(opt, params, args.rounds)
    # HFA averages models every K1 steps in the party and every K1 x K2 steps across parties; the loss
    # is linear, so at a global average the weights are the oracle's (each worker's own SGD steps, averaged).
    every = cfg.hfa.k1 * cfg.hfa.k2 if cfg.hfa.enabled else 1
    # The oracle: one process applying the averaged gradients.
    ref = {name: torch.nn.Parameter(init_value(name).clone()) for name in SHAPES}
    ref_opt = make(list(ref.values()))
    for t in range(args.rounds):
        opt.zero_grad()
        failing = t == 1 and gx.rank() == args.fail_rank
        if failing and args.failure == "raise":
            raise RuntimeError(f"worker {gx.rank()} fails on purpose in round {t}")
        loss = sum((param * base(i, name) * float((gx.rank() + 1) * (t + 1))).sum()
                   for i, (name, param) in enumerate(params.items())
                   if not (failing and args.failure == "unused" and name == "c"))
        if not (failing and args.failure == "no-backward"):
            loss.backward()
        opt.step()
        if args.sync == "async":
            continue
        ref_opt.zero_grad()
        for i, (name, param) in enumerate(ref.items()):
            param.grad = base(i, name) * float(world * (t + 1) / n)
        ref_opt.step()
        if (t + 1) % every:
            continue
        for name, param in params.items():
            got, want = param.data, ref[name].data
            if args.optimizer == "sgd" and not torch.equal(got, want):
                print(f"MISMATCH round {t} {name}: {(got - want).abs().max().item()}", flush=True)
                sys.exit(1)
            if args.optimizer == "adam" and not torch.allclose(got, want, rtol=1e-6, atol=1e-7):
                print(f"MISMATCH round {t} {name}: {(got - want).abs().max().item()}", flush=True)
                sys.exit(1)
        print(f"ROUND {t} OK", flush=True)
        time.sleep(args.sleep)
    if args.sync == "async":
        gx.barrier()
    print("EXACT OK", flush=True)


def esync_run(opt, params, budget):
    """ESync: local steps as the global server assigns them, until the workers' mean step count reaches
    ``budget``; every worker ends on the same global model (its checksum printed as ``FINAL``)."""
    rounds, step = 0, 0
    while opt.mean_steps < budget:
        for _ in range(opt.esync_steps):
            opt.zero_grad()
            sum((param * base(i, name) * float(gx.rank() + 1)).sum() for i, (name, param) in
                enumerate(params.items())).backward()
            opt.step()
            step += 1
        rounds += 1
    total = sum(float(param.double().sum()) for param in params.values())
    print(f"FINAL {total!r} after {rounds} rounds, {step} local steps, mean {opt.mean_steps}", flush=True)
    print("EXACT OK", flush=True)


if __name__ == "__main__":
    main()
