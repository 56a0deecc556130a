"""Fixtures, and the rule that every test is of one kind (the shared helpers are in helpers.py).

Every test is marked ``unit`` (it runs in the pytest process: it starts no process and talks to no other
process) or ``system`` (it starts processes, opens sockets to other processes or runs a topology): a
module of one kind says so once (``pytestmark = pytest.mark.unit``), a mixed module on each test.
Collection stops on a test marked neither or both, and a ``unit`` test that starts a process fails.
``pytest -m unit`` runs the quick half (``make test-unit``), ``pytest -m system`` the rest.

The suite also runs where MXNet is not installed (the core alone, as on Python 3.13: .ci/run's third job). A
module that imports mxnet, itself or through geomx.kvstore, geomx.delivery or examples/utils.py, therefore
starts with ``mx = pytest.importorskip("mxnet")`` before those imports: it is reported skipped instead of
failing collection. A test that needs MXNet in a module that does not says so itself (``pytest.importorskip``
in the test, or ``skipif`` where only the processes it starts import mxnet).
"""
import sys
import threading

import pytest
import zmq
from helpers import run_topology

from geomx import transport

KINDS = ("unit", "system")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects anything: an unmarked test is refused whatever is run
def pytest_collection_modifyitems(config, items):
    wrong = []
    for item in items:
        kinds = sorted({mark.name for mark in item.iter_markers() if mark.name in KINDS})
        if len(kinds) != 1:
            wrong.append(f"  {item.nodeid}: {' and '.join(kinds) if kinds else 'neither'}")
    if wrong:
        raise pytest.UsageError(
            "every test must be marked either `unit` (in-process) or `system` (starts processes, talks to other "
            "processes, runs a topology); see tests/conftest.py. Marked wrongly:\n" + "\n".join(wrong))


# The audit events of everything that starts a process (subprocess, os.fork, os.posix_spawn, os.system, ...).
_SPAWN_EVENTS = {"subprocess.Popen", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.system", "os.exec",
                 "pty.spawn"}
# Standard-library look-ups that run a short probe (ctypes.util.find_library runs `ldconfig -p`, as
# geomx.transport does once for libc; platform runs `uname`; numpy.testing runs `lscpu` when it is first
# imported): not a process the test starts.
_PROBING_MODULES = {"ctypes.util", "platform", "numpy.testing._private.utils"}
_unit_test = {"nodeid": None, "elsewhere": []}


def _a_probe_of(frame) -> bool:
    while frame is not None:
        if frame.f_globals.get("__name__") in _PROBING_MODULES:
            return True
        frame = frame.f_back
    return False


def _refuse_processes_in_unit_tests(event, args):
    if event in _SPAWN_EVENTS and _unit_test["nodeid"] is not None and not _a_probe_of(sys._getframe(1)):
        if threading.current_thread() is not threading.main_thread():
            _unit_test["elsewhere"].append(f"{event} {args!r:.300}")  # reported when the test ends
        # Failed is a BaseException: an `except Exception` on the way cannot swallow it.
        pytest.fail(f"{_unit_test['nodeid']} is marked unit but starts a process ({event}): mark it system")


sys.addaudithook(_refuse_processes_in_unit_tests)


@pytest.fixture(autouse=True)
def _unit_tests_start_no_process(request):
    if request.node.get_closest_marker("unit") is None:
        yield
        return
    _unit_test.update(nodeid=request.node.nodeid, elsewhere=[])
    try:
        yield
    finally:
        elsewhere, _unit_test["nodeid"] = _unit_test["elsewhere"], None
    if elsewhere:  # refused in another thread, whose failure the test itself may not have seen
        pytest.fail(f"{request.node.nodeid} is marked unit but a thread of it started processes: {elsewhere}; "
                    "mark it system")


@pytest.fixture
def zmq_ctx():
    """A ZeroMQ context for one test, destroyed when the test ends, passed or failed: every socket still
    open in it is closed with linger 0 (nothing queued is waited for), so no test can hang in ``term`` or
    leave sockets, ports or I/O threads to the next. Event loops, schedulers and sockets made on it need
    no ``ctx.destroy`` of their own (a test that must close a loop before it asserts still closes it)."""
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def topology_run():
    """``topology_run(script, args, **topology) -> Result``: run ``tests/workers/<script>`` on every worker
    (helpers.run_topology)."""
    return run_topology


@pytest.fixture
def fresh_refusal_log():
    """Refusals are logged once per 5 s per peer and kind in a process; a test that expects its own uses
    this (test_security.py and test_trust.py, for every test)."""
    transport.log_limited._last.clear()


@pytest.fixture(autouse=True)
def _no_role_in_test_process(monkeypatch):
    # The pytest process itself is never a geomx node.
    for name in ("DMLC_ROLE", "DMLC_ROLE_GLOBAL"):
        monkeypatch.delenv(name, raising=False)
