"""The PyTorch front end (geomx.torch) on real topologies, without MXNet in the workers.

* Exact oracles (tests/workers/torch_exact_worker.py): integer-valued gradients averaged over every
  worker, in mode server (the global servers run torch.optim's rule) and mode local (each worker steps
  its own optimizer on the averaged gradient), under FSA, MixedSync, P3, FP16, HFA and a key above the
  big-array bound split over two global servers; zero tolerance where the arithmetic is exact. ESync:
  every worker ends on the same model.
* Equivalence with torch DDP (gloo, 4 ranks, same model, seeds and shards) after 20 steps of SGD with
  momentum and of Adam, in both modes.
* A worker that fails, or misuses the optimizer, stops the whole topology with its reason.
* Unit: the optimizer spec and the parameter checks.
"""
import io
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from helpers import FAST_HEARTBEATS, WORKERS, LineLog, free_port_range, pid_with_environ, run_topology  # noqa: E402

from geomx.errors import GeoMXError  # noqa: E402
from geomx.launch import Topology, run  # noqa: E402
from geomx.optimizer_spec import states_to_wire  # noqa: E402
from geomx.servers.updater import Updater  # noqa: E402
from geomx.torch import DistributedOptimizer  # noqa: E402
from geomx.torch.spec import optimizer_to_spec  # noqa: E402

CASES = {
    "server-sgd": (["--mode", "server"], {}),
    "local-sgd": (["--mode", "local"], {}),
    "server-adam": (["--mode", "server", "--optimizer", "adam"], {}),
    "server-sgd-mixedsync": (["--mode", "server", "--sync", "async"], {}),
    "local-sgd-two-global-servers-split": (["--mode", "local"], dict(global_servers=2, env={
        "MXNET_KVSTORE_BIGARRAY_BOUND": "100000"})),
    "server-sgd-p3": (["--mode", "server"], dict(env={"ENABLE_P3": "1"})),
    "local-sgd-fp16": (["--mode", "local", "--compression", "fp16"], {}),
    # TSEngine across parties and DGT's blocks (mode 2: a second TCP link) under the same exact values.
    "server-sgd-tsengine": (["--mode", "server"], dict(env={"ENABLE_INTER_TS": "1"})),
    "local-sgd-dgt": (["--mode", "local"], dict(env={"ENABLE_DGT": "2", "DMLC_K": "0.5"})),
    # HFA: each worker's own SGD steps, party averages every 2, global every 4: at a global average
    # the weights are the oracle's (the loss is linear), exactly.
    "hfa-k1-2-k2-2": (["--rounds", "8"], dict(env={"MXNET_KVSTORE_USE_HFA": "1", "MXNET_KVSTORE_HFA_K1": "2",
                                                   "MXNET_KVSTORE_HFA_K2": "2"})),
    # ESync: the parties' step counts are assigned at run time, so no closed form: every worker ends on
    # the same global model after the same rounds (checked below).
    "esync": (["--rounds", "6"], dict(env={"GEOMX_USE_ESYNC": "1"})),
}


@pytest.mark.system
@pytest.mark.parametrize("case", sorted(CASES))
def test_exact_oracle(case):
    args, topology = CASES[case]
    topology = dict(topology)
    result = run_topology("torch_exact_worker.py", args, timeout=180, parties=2, workers_per_party=2,
                          env=topology.pop("env", {}), **topology)
    assert result.code == 0, result.output[-4000:]
    assert result.output.count("EXACT OK") == 5, result.output[-4000:]
    assert "MISMATCH" not in result.output
    # ESync: the model's checksum and the global rounds, equal on every worker (the local steps differ
    # by party: that is ESync's point).
    finals = re.findall(r"\] FINAL (\S+ after \d+ rounds)", result.output)
    assert len(finals) == (4 if case == "esync" else 0) and len(set(finals)) <= 1, finals


@pytest.mark.system
def test_exact_oracle_over_curve(tmp_path):
    """Every link encrypted and authenticated (the launcher's --curve): the same exact values."""
    topo = Topology(parties=2, workers_per_party=2, env={})
    topo.make_curve_keys(str(tmp_path / "keys"))
    stream = io.StringIO()
    code = run(topo, [sys.executable, str(WORKERS / "torch_exact_worker.py"), "--mode", "server"], timeout=180,
               stream=stream)
    output = stream.getvalue()
    assert code == 0 and output.count("EXACT OK") == 5, output[-4000:]
    assert output.count(" curve True") == 5, output[-2000:]


@pytest.mark.system
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_global_server_killed_and_restarted_from_its_checkpoint_loses_nothing(tmp_path, optimizer):
    """geomx-launch starts a SIGKILLed global server again from its latest checkpoint (every 3 rounds;
    killed after round 4, so the parties replay a round): every worker's weights after every round still
    equal the uninterrupted oracle's (exactly for SGD; Adam's moments come back from the checkpoint)."""
    topo = Topology(parties=2, workers_per_party=1, env=dict(
        FAST_HEARTBEATS, GEOMX_START_TIMEOUT="60", GEOMX_CHECKPOINT_DIR=str(tmp_path), GEOMX_CHECKPOINT_EVERY="3",
        GEOMX_RESTART_TIMEOUT="60"))
    out = LineLog()
    result: dict = {}
    cmd = [sys.executable, str(WORKERS / "torch_exact_worker.py"), "--rounds", "10", "--sleep", "0.3",
           "--optimizer", optimizer]
    runner = threading.Thread(target=lambda: result.update(rc=run(topo, cmd, stream=out, timeout=240)), daemon=True)
    runner.start()
    try:
        out.wait_for(r"^\[party1/worker0\] ROUND 4 OK", 120)
        os.kill(pid_with_environ("DMLC_ROLE_GLOBAL=global_server", f"GEOMX_CHECKPOINT_DIR={tmp_path}"), signal.SIGKILL)
        out.wait_for(r"^\[global_scheduler\] .*server global_server \(rank 0\) restarted", 60)
    finally:
        runner.join(240)
    text = out.text()
    assert result.get("rc") == 0, text[-8000:]
    assert "MISMATCH" not in text and text.count("EXACT OK") == 3, text[-8000:]
    assert re.search(r"replayed [1-9]\d* answered push\(es\) after its checkpoint", text), text[-8000:]


@pytest.mark.system
@pytest.mark.parametrize("failure,reason", [
    ("raise", "worker 1 fails on purpose in round 1"),
    ("no-backward", "step() without backward()"),
    ("unused", "parameter 'c' got no gradient in this step"),
    ("late-compression", "compression= must be set before the parameters are declared"),
])
def test_a_failing_worker_stops_everything_with_its_reason(failure, reason):
    result = run_topology("torch_exact_worker.py", ["--fail-rank", "1", "--failure", failure, "--rounds", "3"],
                          timeout=120, parties=2, workers_per_party=2)
    assert result.code != 0, result.output[-3000:]
    assert reason in result.output, result.output[-3000:]


@pytest.mark.system
@pytest.mark.parametrize("optimizer,mode,tolerance", [
    ("sgd", "server", 1e-5), ("sgd", "local", 1e-5), ("adam", "server", 1e-4), ("adam", "local", 1e-4)])
def test_equals_torch_ddp(tmp_path, optimizer, mode, tolerance):
    """Four geomx workers (2 parties x 2) against four DDP ranks over gloo: the same parameters after
    20 steps, within ``tolerance`` relative to each tensor's largest value."""
    script = str(WORKERS / "torch_equiv_worker.py")
    args = ["--optimizer", optimizer, "--mode", mode, "--out", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DMLC_", "GEOMX_"))}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
                          "--master-port", str(free_port_range(1)), script, "--ddp", *args],
                         capture_output=True, text=True, timeout=180, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    result = run_topology("torch_equiv_worker.py", args, timeout=180, parties=2, workers_per_party=2)
    assert result.code == 0, result.output[-3000:]
    for rank in range(4):
        with np.load(tmp_path / f"ddp-{rank}.npz") as a, np.load(tmp_path / f"geomx-{rank}.npz") as b:
            for name in a.files:
                error = np.abs(a[name] - b[name]).max() / np.abs(a[name]).max()
                assert error <= tolerance, (rank, name, error)


# -- unit ------------------------------------------------------------------------------------------------

def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


@pytest.mark.unit
def test_spec_carries_hyper_parameters_and_group_multipliers():
    net = _net()
    w0, b0, w1, b1 = net.parameters()
    opt = torch.optim.SGD([{"params": [w0, b0]}, {"params": [w1, b1], "lr": 0.05, "weight_decay": 2e-4}],
                          lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    spec = optimizer_to_spec(opt, {id(p): k for k, p in enumerate(net.parameters())})
    assert (spec["name"], spec["rule"], spec["lr"]) == ("sgd", "torch", 0.1)
    assert spec["params"]["momentum"] == 0.9 and spec["params"]["nesterov"] is True
    assert spec["lr_mult"] == {"2": 0.5, "3": 0.5} and spec["wd_mult"] == {"2": 2.0, "3": 2.0}


@pytest.mark.unit
def test_spec_refusals_name_the_way_out():
    net = _net()
    keys = {id(p): k for k, p in enumerate(net.parameters())}
    with pytest.raises(GeoMXError, match="mode='local'"):
        optimizer_to_spec(torch.optim.Adamax(net.parameters()), keys)
    w0, b0, w1, b1 = net.parameters()
    opt = torch.optim.Adam([{"params": [w0, b0]}, {"params": [w1, b1], "betas": (0.8, 0.9)}])
    with pytest.raises(GeoMXError, match="group 1 differs from group 0 in betas"):
        optimizer_to_spec(opt, keys)


@pytest.mark.unit
def test_updater_runs_a_torch_spec_like_torch_without_mxnet():
    """The global server's updater on a torch-rule spec: torch.optim.AdamW's values over 5 steps,
    a float16 key refused by name."""
    p = torch.nn.Parameter(torch.linspace(-1, 1, 50))
    opt = torch.optim.AdamW([p], lr=0.01, weight_decay=0.1)
    updater = Updater(optimizer_to_spec(opt, {id(p): 7}))
    assert updater.engine == "numpy"
    store = p.detach().numpy().copy()
    for step in range(5):
        grad = np.cos(np.arange(50, dtype=np.float32) * (step + 1))
        store = updater.apply(7, 7, store, grad.copy())
        p.grad = torch.from_numpy(grad)
        opt.step()
    np.testing.assert_allclose(store, p.detach().numpy(), rtol=1e-6, atol=1e-7)
    with pytest.raises(GeoMXError, match="float32 weights only"):
        updater.apply(8, 8, np.zeros(3, np.float16), np.ones(3, np.float16))
    # Loaded states that are not float32 are refused too, rather than handed to an MXNet engine.
    desc, blob = states_to_wire({7: (np.zeros(50, np.float64), np.zeros(50, np.float64))})
    with pytest.raises(GeoMXError, match="float32 weights only"):
        updater.load_states(desc, blob)


@pytest.mark.unit
@pytest.mark.parametrize("what,match", [
    ("shared", "one tensor"), ("bfloat16", "bfloat16"), ("not-in-optimizer", "same parameters")])
def test_parameter_checks(what, match):
    net = _net()
    named = list(net.named_parameters())
    params = [p for _, p in named]
    if what == "shared":
        named.append(("again", named[0][1]))
    elif what == "bfloat16":
        net.to(torch.bfloat16)
    elif what == "not-in-optimizer":
        params = params[:-1]
    with pytest.raises(GeoMXError, match=match):
        DistributedOptimizer._check_parameters(torch.optim.SGD(params, lr=0.1), named)


def test_runs_without_mxnet_installed_view():
    """The front end's modules import no MXNet (a torch install need not have it)."""
    code = "import sys, geomx, geomx.torch, geomx.store; print('mxnet' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DMLC_", "GEOMX_"))}
    env["DMLC_ROLE"] = "worker"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env,
                         cwd=str(Path(__file__).parent))
    assert out.returncode == 0 and out.stdout.split() == ["False"], out.stderr[-2000:]


test_runs_without_mxnet_installed_view = pytest.mark.system(test_runs_without_mxnet_installed_view)
