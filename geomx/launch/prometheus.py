"""The Prometheus scrape configuration of a topology (``geomx-launch ... --print-prometheus``).

One static target per process that serves metrics, labelled with the process's name, role and site,
so a PromQL query can pick a party's WAN link without knowing ports:
``geomx_link_sent_bytes_total{geomx_role="local_server", scope="wan"}`` is one series per local
server, i.e. per party link. YAML is written by hand: every value is quoted, so no YAML library is
needed and a name cannot break the file.
"""
from __future__ import annotations

import json
from typing import Iterable, List, NamedTuple


class Target(NamedTuple):
    name: str  # the launcher's process name: "party0/server0"
    role: str  # metrics role: "local_server", "global_server", "worker", ...
    site: str  # "party0", "central", or "global" for the global tier's own processes
    host: str
    port: int


def targets_of(specs) -> List[Target]:
    """The metrics listener of each process (``ProcessSpec``) that has one (GEOMX_METRICS_PORT)."""
    return [Target(s.name, s.role, s.site or s.dc, *s.metrics_address) for s in specs
            if s.metrics_address is not None]


def _q(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid double-quoted YAML scalar


def scrape_config(targets: Iterable[Target], interval: float = 5.0, job: str = "geomx") -> str:
    """A prometheus.yml for ``targets`` (scraped every ``interval`` seconds)."""
    lines = ["# Written by geomx-launch --print-prometheus: one target per geomx process (docs/Observability.md).",
             "global:", f"  scrape_interval: {interval:g}s", f"  scrape_timeout: {min(interval, 10.0):g}s",
             "scrape_configs:", f"  - job_name: {_q(job)}", "    metrics_path: /metrics", "    static_configs:"]
    for t in targets:
        labels = f"geomx_process: {_q(t.name)}, geomx_role: {_q(t.role)}, geomx_site: {_q(t.site)}"
        lines += [f"      - targets: [{_q(f'{t.host}:{t.port}')}]", f"        labels: {{{labels}}}"]
    return "\n".join(lines) + "\n"
