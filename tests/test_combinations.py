"""The combination matrix (issue 26): every switch that changes the data path crossed pairwise, each
case a real topology (2 parties x 2 workers, real processes and sockets) checked round by round against
a single-process model with zero tolerance (tests/workers/matrix_worker.py), and every pair that geomx
refuses asserted refused, with its message.

The factors and their levels are FACTORS; REFUSED says which pairs (or, where a pair is refused only
with a third switch, which triples) geomx refuses, where (at start-up in config.py, or at run time
with a reply) and with which message. CASES is a covering array built from both, deterministically:
greedily, the allowed combination that covers the most pairs not yet covered, until every allowed pair
is in some case. ``test_every_pair_is_covered_or_refused`` checks that, so adding a level or a switch
to FACTORS grows the matrix by itself; a pair that fails at run time must be fixed or added to REFUSED
(with its message, which the refusal tests then require).
"""
from __future__ import annotations

import importlib.util
import io
import itertools
import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from helpers import WORKERS

from geomx import config, metrics
from geomx.errors import ConfigError
from geomx.launch import Topology, run

FACTORS: Dict[str, Tuple[str, ...]] = {
    "sync": ("fsa", "mixedsync", "hfa", "esync"),
    "optimizer": ("none", "sgd", "momentum", "adam", "dcasgd"),  # on the global servers
    "codec": ("none", "fp16", "bsc", "mpq"),
    "tsengine": ("off", "inter", "intra"),
    "p3": ("off", "on"),
    "global_servers": ("1", "2"),  # 2: keys 1 and 2 split between them (MXNET_KVSTORE_BIGARRAY_BOUND)
    "dgt": ("off", "on"),  # ENABLE_DGT=1: blocks over UDP
    "curve": ("off", "on"),
}


class Refusal:
    """``when`` (a dict factor -> level, two or three of them) is refused ``where`` ("config": the
    process refuses to start; "run": a reply or an error at run time) with a message containing
    ``message``."""

    def __init__(self, where: str, message: str, tested: bool = True, **when: str):
        self.where, self.message, self.when, self.tested = where, message, when, tested

    def matches(self, case: Dict[str, str]) -> bool:
        return all(case[f] == level for f, level in self.when.items())

    def __repr__(self) -> str:
        return "+".join(f"{f}={v}" for f, v in self.when.items())


_CONFIG = "cannot be combined with"
REFUSED: List[Refusal] = [
    # config.REFUSED_COMBINATIONS (docs/Configurations.md)
    Refusal("config", f"ENABLE_P3 {_CONFIG} MXNET_KVSTORE_USE_HFA", p3="on", sync="hfa"),
    Refusal("config", f"ENABLE_P3 {_CONFIG} GEOMX_USE_ESYNC", p3="on", sync="esync"),
    Refusal("config", f"ENABLE_P3 {_CONFIG} ENABLE_INTER_TS", p3="on", tsengine="inter"),
    Refusal("config", f"ENABLE_P3 {_CONFIG} ENABLE_INTRA_TS", p3="on", tsengine="intra"),
    Refusal("config", f"ENABLE_INTRA_TS {_CONFIG} GEOMX_USE_ESYNC", tsengine="intra", sync="esync"),
    Refusal("config", f"ENABLE_INTER_TS {_CONFIG} MXNET_KVSTORE_USE_HFA", tsengine="inter", sync="hfa"),
    Refusal("config", f"ENABLE_INTER_TS {_CONFIG} GEOMX_USE_ESYNC", tsengine="inter", sync="esync"),
    Refusal("config", f"ENABLE_INTER_TS {_CONFIG} GEOMX_CURVE_SECRET_KEY", tsengine="inter", curve="on"),
    Refusal("config", f"ENABLE_DGT {_CONFIG} MXNET_KVSTORE_USE_HFA", dgt="on", sync="hfa"),
    Refusal("config", f"ENABLE_DGT {_CONFIG} GEOMX_USE_ESYNC", dgt="on", sync="esync"),
    Refusal("config", f"ENABLE_DGT {_CONFIG} ENABLE_P3", dgt="on", p3="on"),
    Refusal("config", f"ENABLE_DGT {_CONFIG} ENABLE_INTER_TS", dgt="on", tsengine="inter"),
    # config.py's own check: the global server is the root of the parties' aggregation tree
    Refusal("config", "ENABLE_INTER_TS=1 needs DMLC_NUM_GLOBAL_SERVER=1", tsengine="inter", global_servers="2"),
    # refused at run time, by the servers or the master worker's store
    Refusal("run", "P3 (ENABLE_P3=1) works with dist_sync only", p3="on", sync="mixedsync"),
    Refusal("run", "ENABLE_INTER_TS=1 works with dist_sync only", tsengine="inter", sync="mixedsync"),
    Refusal("run", "needs an optimizer on the global server", sync="mixedsync", optimizer="none"),
    # the master worker's codec, checked by the global server when it is set
    *[Refusal("run", f"'{c}' cannot be combined with DGT", dgt="on", codec=c) for c in ("fp16", "bsc", "mpq")],
    *[Refusal("run", f"{c} cannot be combined with ENABLE_INTER_TS=1", tsengine="inter", codec=c)
      for c in ("bsc", "mpq")],
    Refusal("run", "average the parties' models and run no optimizer", sync="hfa", optimizer="sgd"),
    Refusal("run", "average the parties' models and run no optimizer", sync="hfa", optimizer="momentum"),
    Refusal("run", "average the parties' models and run no optimizer", sync="hfa", optimizer="adam"),
    Refusal("run", "average the parties' models and run no optimizer", sync="hfa", optimizer="dcasgd"),
    Refusal("run", "average the parties' models and run no optimizer", sync="esync", optimizer="sgd"),
    Refusal("run", "average the parties' models and run no optimizer", sync="esync", optimizer="momentum"),
    Refusal("run", "average the parties' models and run no optimizer", sync="esync", optimizer="adam"),
    Refusal("run", "average the parties' models and run no optimizer", sync="esync", optimizer="dcasgd"),
    # BSC and MPQ with an optimizer under FSA: each party's local server runs it (in numpy) on the party's
    # gradient and the WAN carries its sparsified steps; DC-ASGD runs in MXNet's engine only, which local
    # servers do not load (under MixedSync the global server's optimizer runs on each arrival).
    *[Refusal("run", "runs the optimizer on each party's local server", sync="fsa", codec=c, optimizer="dcasgd")
      for c in ("bsc", "mpq")],
]


def refusal_of(case: Dict[str, str]):
    return next((r for r in REFUSED if r.matches(case)), None)


def _pairs(case: Dict[str, str]):
    items = sorted(case.items())
    return {(a, b) for a, b in itertools.combinations(items, 2)}


def _allowed_pairs():
    """Every pair of levels that no two-switch refusal forbids, with whether some allowed case has it."""
    out = set()
    for (f1, l1s), (f2, l2s) in itertools.combinations(sorted(FACTORS.items()), 2):
        for l1, l2 in itertools.product(l1s, l2s):
            if not any(len(r.when) == 2 and r.matches({**{f: None for f in FACTORS}, f1: l1, f2: l2})
                       for r in REFUSED):
                out.add(((f1, l1), (f2, l2)))
    return out


def covering_cases() -> List[Dict[str, str]]:
    """A deterministic covering array of the allowed combinations (greedy: each step takes the allowed
    combination covering the most uncovered allowed pairs; ties: the first in FACTORS' order)."""
    names = list(FACTORS)
    allowed = [dict(zip(names, levels)) for levels in itertools.product(*FACTORS.values())]
    allowed = [c for c in allowed if refusal_of(c) is None]
    todo = _allowed_pairs()
    cases = []
    while todo:
        best = max(allowed, key=lambda c: len(_pairs(c) & todo))
        gain = _pairs(best) & todo
        if not gain:
            break  # what is left appears in no allowed combination: the coverage test names it
        todo -= gain
        cases.append(best)
    return cases


CASES = covering_cases()


def case_id(case: Dict[str, str]) -> str:
    return "-".join(f"{case[f]}" if f in ("sync", "optimizer", "codec") else f"{f}:{case[f]}"
                    for f in FACTORS if case[f] not in ("off", "1") or f in ("sync", "optimizer", "codec"))


def topology(case: Dict[str, str], tmp_path: Path) -> Topology:
    env = {"PS_VERBOSE": "0", "MXNET_KVSTORE_BIGARRAY_BOUND": "1000", "GEOMX_METRICS_DIR": str(tmp_path / "metrics")}
    if case["sync"] == "hfa":
        env.update(MXNET_KVSTORE_USE_HFA="1", MXNET_KVSTORE_HFA_K1="2", MXNET_KVSTORE_HFA_K2="2")
    if case["sync"] == "esync":
        env["GEOMX_USE_ESYNC"] = "1"
    if case["tsengine"] == "inter":
        env["ENABLE_INTER_TS"] = "1"
    if case["tsengine"] == "intra":
        env["ENABLE_INTRA_TS"] = "1"
    if case["p3"] == "on":
        env.update(ENABLE_P3="1", GEOMX_P3_SLICE_SIZE="700")
    if case["dgt"] == "on":
        # DMLC_K 0.5: half the blocks on the reliable channel; a long grace period, so that a loss-free
        # run cannot depend on this machine's speed (a complete push is delivered at its last block).
        env.update(ENABLE_DGT="1", DMLC_K="0.5", DGT_GRACE_MS="5000")
    topo = Topology(parties=2, workers_per_party=2, global_servers=int(case["global_servers"]), env=env)
    if case["curve"] == "on":
        topo.make_curve_keys(str(tmp_path / "keys"))
    return topo


def run_case(case: Dict[str, str], tmp_path: Path, timeout: float = 150):
    topo = topology(case, tmp_path)
    worker_case = {k: case[k] for k in ("sync", "codec", "optimizer", "global_servers")}
    args = ["--slice", "{slice}", "--case", json.dumps(worker_case), "--turn", str(tmp_path / "turn")]
    (tmp_path / "turn").write_text("0")
    stream = io.StringIO()
    code = run(topo, [sys.executable, str(WORKERS / "matrix_worker.py"), *args], timeout=timeout, stream=stream)
    return code, stream.getvalue()


def _worker_module():
    spec = importlib.util.spec_from_file_location("matrix_worker", WORKERS / "matrix_worker.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_esync(codec: str, output: str) -> None:
    """ESync's steps come from the state server: every worker printed its own per round; the models
    they then hold must be the averaging model's for exactly those steps."""
    rows = re.findall(r"ESYNC round (\d+) slice (\d+) steps (\d+) model (\w+)", output)
    rounds = 1 + max(int(r) for r, *_ in rows)
    steps = [[0] * 4 for _ in range(rounds)]
    models = {}
    for r, s, n, digest in rows:
        steps[int(r)][int(s)] = int(n)
        models.setdefault(int(r), set()).add(digest)
    assert len(rows) == 4 * rounds, output[-4000:]
    want = _worker_module().esync_models(codec, 2, 2, steps)
    for r in range(rounds):
        assert models[r] == {want[r]}, f"ESync round {r}: steps {steps[r]}, models {models[r]}, model {want[r]}"


@pytest.mark.unit
def test_every_pair_is_covered_or_refused():
    """Every pair of levels is in a case that runs, or a refusal names it (alone, or with a third
    switch while some case runs the pair otherwise)."""
    covered = set().union(*(_pairs(c) for c in CASES))
    for pair in itertools.combinations(sorted((f, lv) for f, lvs in FACTORS.items() for lv in lvs), 2):
        (f1, l1), (f2, l2) = pair
        if f1 == f2:
            continue
        refused = [r for r in REFUSED if len(r.when) == 2 and r.matches({**{f: None for f in FACTORS}, f1: l1, f2: l2})]
        assert refused or pair in covered, f"{pair} is neither run nor refused"
    assert all(refusal_of(c) is None for c in CASES)
    assert len({json.dumps(c, sort_keys=True) for c in CASES}) == len(CASES)


@pytest.mark.unit
def test_config_refusals_are_config_rules():
    """The refusals said to come from config.py are exactly its REFUSED_COMBINATIONS among FACTORS' switches,
    and a node started with such a pair is refused with the message (tested for real below)."""
    in_table = {(r.first, r.second) for r in config.REFUSED_COMBINATIONS}
    for r in REFUSED:
        if r.where == "config" and _CONFIG in r.message:
            first, _, second = r.message.partition(f" {_CONFIG} ")
            assert (first, second) in in_table, r


@pytest.mark.system
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_combination_matches_single_process_model(case, tmp_path):
    code, output = run_case(case, tmp_path)
    assert code == 0, output[-6000:]
    assert not re.findall(r"MISMATCH", output), output[-6000:]
    assert len(re.findall(r"MATRIX OK slice \d", output)) == 4, output[-6000:]
    if case["sync"] == "esync":
        check_esync(case["codec"], output)
    if case["dgt"] == "on":  # every local server sent blocks over DGT's reliable channel
        sent = [metrics.by_label(r, "geomx_dgt_blocks_sent_total", "kind").get("reliable", 0)
                for r in metrics.of_role(metrics.load_dumps(str(tmp_path / "metrics")), "local_server")]
        assert len(sent) == 2 and all(n > 0 for n in sent), (sent, output[-4000:])


def _refusal_case(refusal: Refusal) -> Dict[str, str]:
    """The first allowed-looking combination with the refusal's switches set."""
    base = {f: levels[0] for f, levels in FACTORS.items()}
    case = {**base, **refusal.when}
    if case["sync"] == "mixedsync" and case["optimizer"] == "none" and "optimizer" not in refusal.when:
        case["optimizer"] = "sgd"
    return case


def _config_errors(case: Dict[str, str], tmp_path: Path) -> List[str]:
    """What config.load says to each process of the case's topology, as the launcher starts it (each
    role reads its own switches: ENABLE_INTRA_TS only the local servers, for example)."""
    errors = []
    for spec in topology(case, tmp_path).processes(["true"]):
        try:
            config.load(spec.env)
        except ConfigError as exc:
            errors.append(str(exc))
    return errors


@pytest.mark.system
@pytest.mark.parametrize("refusal", [r for r in REFUSED if r.where == "run" and r.tested], ids=repr)
def test_refused_at_run_time_with_its_message(refusal, tmp_path):
    case = _refusal_case(refusal)
    code, output = run_case(case, tmp_path, timeout=90)
    assert code != 0, output[-4000:]
    assert refusal.message in output, output[-4000:]
    assert not re.findall(r"MATRIX OK", output)


@pytest.mark.unit
@pytest.mark.parametrize("refusal", [r for r in REFUSED if r.where == "config"], ids=repr)
def test_refused_at_start_with_its_message(refusal, tmp_path):
    errors = _config_errors(_refusal_case(refusal), tmp_path)
    assert errors and all(refusal.message in e for e in errors), errors
