"""Start a whole GeoMX topology (global layer + parties): on one machine, or on the sites and hosts of a
topology file (one site here with ``--site``, or every host over SSH).

The package: :mod:`.layout` (a topology's sites and hosts, and the one place its process list is derived:
names, roles, environments, ports, hosts), :mod:`.topology` (the single-machine form, a layout on this
machine), :mod:`.sitefile` (topology files: a layout over sites, hosts and fixed ports), :mod:`.supervisor`
(starting, relaying and stopping processes), :mod:`.ssh` and :mod:`.remote` (processes on other hosts),
:mod:`.cli` (``geomx-launch``: one parser per form).

The topology is the one of the original GeoMX demo scripts (see
``shared/reference/geomx-behaviour.md`` §1.4), generalised:

* a central party with a global scheduler, ``global_servers`` global servers, a
  scheduler and a master worker (plus ``central_workers - 1`` more training
  workers when the central party trains);
* ``parties`` parties, each with a scheduler, one local server and
  ``workers_per_party`` workers.

Non-worker processes run ``node_command`` (by default ``python -m geomx.node``),
which reads its role from the environment; workers run the user's command, in
which ``{slice}``, ``{party}`` and ``{rank}`` are substituted.

Usage::

    python -m geomx.launch -p 2 -w 2 -- python examples/cnn.py --data-slice-idx {slice}
    python -m geomx.launch --dry-run -p 2 -w 2 -- python train.py
    python -m geomx.launch --topology topo.toml --print-firewall
    python -m geomx.launch --topology topo.toml [--site NAME] -- python train.py -ds {slice}

The package must stay free of MXNet imports so that the launcher starts fast.
"""

from .cli import main
from .layout import DEFAULT_NODE_COMMAND, ROLE_KEYS, Layout, ProcessSpec
from .supervisor import EXIT_STRAGGLER, EXIT_TIMEOUT, run
from .topology import Ports, Topology, free_ports

__all__ = ["Topology", "Layout", "ProcessSpec", "Ports", "free_ports", "run", "main", "DEFAULT_NODE_COMMAND",
           "ROLE_KEYS", "EXIT_TIMEOUT", "EXIT_STRAGGLER"]
