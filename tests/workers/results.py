"""What a test worker reports to the test that started it, as data rather than printed lines: one JSON
object per worker process, in a file of the directory ``GEOMX_TEST_RESULTS`` names (tests/helpers.py's
run_topology sets it and reads the files back as ``Result.reports``). Without the variable (a worker
started by hand, or by a test that reads its lines) nothing is written. Workers still print their
lines for the people reading a log.

``report(**fields)`` adds ``fields`` to this process's object and rewrites its file (whole: a reader
never sees half of it), so a worker can report as it goes (its slice first, its result at the end)."""
import json
import os

VARIABLE = "GEOMX_TEST_RESULTS"

_fields: dict = {}


def report(**fields) -> None:
    directory = os.environ.get(VARIABLE)
    if not directory:
        return
    _fields.update(fields, pid=os.getpid())
    path = os.path.join(directory, f"worker-{os.getpid()}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(_fields, f)
    os.replace(path + ".tmp", path)
