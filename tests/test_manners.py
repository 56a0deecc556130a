"""Manners inside a user's process: importing geomx and making its store leave the application's
logging handlers and ``sys.excepthook`` alone, while a script that dies of an exception still stops the
topology at once, and geomx's log lines still show where the application configured no logging."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parent.parent

_APP = """
import logging, sys
logging.basicConfig(level=logging.WARNING, format="APP %(message)s")
handlers = list(logging.getLogger().handlers)
def app_hook(kind, value, tb):
    pass
sys.excepthook = app_hook
{first}
import geomx
import geomx.kvstore  # what a worker's `import geomx` loads (it registers the store)
geomx_logger = logging.getLogger("geomx")
print(sys.excepthook is app_hook, logging.getLogger().handlers == handlers, geomx_logger.handlers,
      geomx_logger.propagate, geomx_logger.level, "mxnet" in sys.modules)
"""


@pytest.mark.parametrize("first,role", [("", "worker"), ("import mxnet", None)])
def test_import_leaves_logging_and_excepthook_alone(first, role):
    """A worker's `import geomx` (DMLC_ROLE=worker), or `import mxnet` then `import geomx` elsewhere:
    both load the MXNet front end, and neither may change the application's hook or handlers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DMLC_", "GEOMX_"))}
    if role:
        env["DMLC_ROLE"] = role
    out = subprocess.run([sys.executable, "-c", _APP.format(first=first)], capture_output=True, text=True,
                         timeout=120, env=env, cwd=str(ROOT / "tests"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["True", "True", "[]", "True", "0", "True"]


_FALLBACK = """
import logging, sys
from geomx import logutil
logutil.setup_default(0, "worker3")
log = logging.getLogger("geomx.kvstore")
log.info("before the application configured logging")
logging.basicConfig(level=logging.INFO, format="APP %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
log.info("after")
logging.getLogger().handlers.clear()
log.warning("handlers gone again")
"""


def test_fallback_prints_only_while_the_application_configured_nothing():
    out = subprocess.run([sys.executable, "-c", _FALLBACK], capture_output=True, text=True, timeout=60,
                         cwd=str(ROOT / "tests"))
    assert out.returncode == 0, out.stderr
    lines = [line.split(" ", 1)[1] for line in out.stderr.splitlines()]  # without geomx's time stamp
    assert lines == ["INFO [worker3] before the application configured logging",
                     "INFO geomx.kvstore: after",  # the "APP" prefix is the first word
                     "WARNING [worker3] handlers gone again"]


def test_application_logging_and_hook_in_a_topology(topology_run):
    """In a real topology: every worker (and the master worker) still has its own handlers and hook
    after making the store and training a round; a worker that then dies of an exception is reported
    by the application's hook, the topology still learns why at once, and geomx's error about it on
    the other worker of that party goes through the application's handler."""
    result = topology_run("app_manners_worker.py", ["--slice", "{slice}", "--crash-slice", "1"],
                          parties=2, workers_per_party=2, timeout=100, env={"PS_HEARTBEAT_TIMEOUT": "60"})
    assert result.code != 0
    assert len(result.lines("MANNERS OK")) == 5, result.output[-6000:]
    assert not result.lines("MANNERS FAIL") and not result.lines("MISMATCH"), result.output[-6000:]
    assert len(result.lines("APP HOOK RuntimeError: injected failure")) == 1, result.output[-6000:]
    assert not result.lines("Traceback"), result.output[-6000:]  # every worker's hook is the application's
    assert any("failed: RuntimeError: injected failure" in line for line in result.lines("APP ERROR geomx.")), \
        result.output[-6000:]
