"""Exact oracles over a real two-tier topology: integer-valued pushes whose float32 sums are exact,
compared with zero tolerance at every round (tests/workers/exact_worker.py does the comparing and reports
it: exact_slices)."""
import pytest
from helpers import exact_slices

pytestmark = pytest.mark.system

CASES = {
    # name: (worker args, topology)
    "push-then-pull": (["--mode", "push-pull"], dict(parties=2, workers_per_party=2)),
    "pushpull-sgd": (["--mode", "pushpull", "--optimizer", "sgd"], dict(parties=2, workers_per_party=2)),
    "lists-3-parties": (["--mode", "list"], dict(parties=3, workers_per_party=1)),
    # Two global servers, and a low split bound so key 2 (300k elements) is cut in two.
    "two-global-servers-split": (["--mode", "pushpull", "--optimizer", "sgd"],
                                 dict(parties=2, workers_per_party=2, global_servers=2,
                                      env={"MXNET_KVSTORE_BIGARRAY_BOUND": "1000"})),
    # Several local servers in a party (the original refuses them): keys divided along the global
    # servers' parts, so global servers see one aggregate per party whatever each party's count.
    "local-servers-3-global-1": (["--mode", "pushpull", "--optimizer", "sgd"],
                                 dict(parties=2, workers_per_party=2, local_servers=3,
                                      env={"MXNET_KVSTORE_BIGARRAY_BOUND": "1000"})),
    "local-servers-2-global-2": (["--mode", "push-pull"],
                                 dict(parties=2, workers_per_party=2, local_servers=2, global_servers=2,
                                      env={"MXNET_KVSTORE_BIGARRAY_BOUND": "1000"})),
    "local-servers-2-and-1-global-3": (["--mode", "pushpull", "--optimizer", "sgd"],
                                       dict(parties=2, workers_per_party=2, local_servers=(2, 1),
                                            global_servers=3, env={"MXNET_KVSTORE_BIGARRAY_BOUND": "1000"})),
    # P3: keys cut into slices sent by priority (key 2 into 8, the last one partial; keys 0, 1, 3
    # below the slice size travel whole). The values must be exactly those of plain FSA.
    "p3-push-then-pull": (["--mode", "push-pull"],
                          dict(parties=2, workers_per_party=2, env={"ENABLE_P3": "1"})),
    # P3 on the parties only (as the original's run_p3.sh leaves the master worker out), two global
    # servers: each server's half of key 2 is cut into 4096-element slices, so slices start inside
    # a server's part and end with a partial one; the global servers run SGD per slice.
    "p3-pushpull-sgd-two-global-servers": (
        ["--mode", "pushpull", "--optimizer", "sgd"],
        dict(parties=2, workers_per_party=2, global_servers=2, env={"MXNET_KVSTORE_BIGARRAY_BOUND": "1000"},
             node_env={"party*": {"ENABLE_P3": "1", "GEOMX_P3_SLICE_SIZE": "4096"}})),
    # P3 with two local servers per party: each local server's share of key 2 is sliced.
    "p3-local-servers-2-global-2": (["--mode", "push-pull"],
                                    dict(parties=2, workers_per_party=2, local_servers=2, global_servers=2,
                                         env={"MXNET_KVSTORE_BIGARRAY_BOUND": "1000", "ENABLE_P3": "1",
                                              "GEOMX_P3_SLICE_SIZE": "4096"})),
    # Central workers train (DMLC_ENABLE_CENTRAL_WORKER=1, set by the launcher with central_workers):
    # the master worker and one more central worker push straight into the global server's rounds,
    # which complete only once both parties' aggregates are in too, whichever arrives last.
    "central-workers-train-sgd": (["--mode", "pushpull", "--optimizer", "sgd", "--master-trains"],
                                  dict(parties=2, workers_per_party=2, central_workers=2)),
    "central-workers-train": (["--mode", "push-pull", "--master-trains"],
                              dict(parties=2, workers_per_party=1, central_workers=3)),
    # ... and under MixedSync (dist_async): each party's aggregate is applied on arrival, the central
    # workers' pushes are summed among themselves and applied once per round; the final weights are
    # exact whatever the order. (The parties' updates used to advance the central workers' round
    # counter, so their second round was refused as "complete already"; and a party that stopped
    # failed the central workers' open rounds: the master worker's sleep makes the parties finish first.)
    "central-workers-train-mixedsync": (["--mode", "pushpull", "--optimizer", "sgd", "--master-trains",
                                         "--store", "dist_async", "--master-sleep", "0.5"],
                                        dict(parties=2, workers_per_party=2, central_workers=2)),
    # TSEngine across parties: partial sums climb an aggregation tree of local servers, results come
    # back by relay; the pulled values must be the plain FSA oracle's, bit for bit.
    "inter-ts-3-parties": (["--mode", "push-pull"],
                           dict(parties=3, workers_per_party=2, env={"ENABLE_INTER_TS": "1"})),
    "inter-ts-4-parties-sgd": (["--mode", "pushpull", "--optimizer", "sgd"],
                               dict(parties=4, workers_per_party=1,
                                    env={"ENABLE_INTER_TS": "1", "MAX_GREED_RATE_TS": "0.5"})),
    # ... inside each party (workers -> local server), and in both tiers at once.
    "intra-ts-3-workers": (["--mode", "push-pull"],
                           dict(parties=2, workers_per_party=3, env={"ENABLE_INTRA_TS": "1"})),
    "intra-and-inter-ts-sgd": (["--mode", "pushpull", "--optimizer", "sgd"],
                               dict(parties=3, workers_per_party=2,
                                    env={"ENABLE_INTRA_TS": "1", "ENABLE_INTER_TS": "1"})),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_exact_oracle(topology_run, case):
    args, topo = CASES[case]
    workers = topo["parties"] * topo["workers_per_party"] + topo.get("central_workers", 0)
    result = topology_run("exact_worker.py", ["--slice", "{slice}", "--rounds", "4", *args], **topo)
    assert result.code == 0, result.output[-4000:]
    assert exact_slices(result) == list(range(workers)), (result.reports, result.output[-4000:])
