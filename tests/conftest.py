"""Shared helpers: run a whole local topology and capture its output."""
import io
import sys
from pathlib import Path

import pytest

from geomx.launch import Topology, run

ROOT = Path(__file__).resolve().parent.parent
WORKERS = ROOT / "tests" / "workers"


class Result:
    def __init__(self, code: int, output: str):
        self.code = code
        self.output = output

    def lines(self, needle: str):
        return [line for line in self.output.splitlines() if needle in line]


@pytest.fixture
def topology_run():
    """``topology_run(script, args, **topology) -> Result``: run ``tests/workers/<script>`` on every worker."""

    def _run(script, args=(), timeout=120, env=None, **kw):
        topo = Topology(env=dict(env or {}), **kw)
        stream = io.StringIO()
        code = run(topo, [sys.executable, str(WORKERS / script), *args], timeout=timeout, stream=stream)
        return Result(code, stream.getvalue())

    return _run


@pytest.fixture(autouse=True)
def _no_role_in_test_process(monkeypatch):
    # The pytest process itself is never a geomx node.
    for name in ("DMLC_ROLE", "DMLC_ROLE_GLOBAL"):
        monkeypatch.delenv(name, raising=False)
