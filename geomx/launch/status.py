"""The launcher's live status page: every node's /metrics.json, polled and summed into one page of the run.

:class:`StatusPage` polls each node's ``/metrics.json`` (geomx/metrics.py) about once a second from a
thread of its own and serves, with the standard library's HTTP server:

- ``/``: a read-only page (plain HTML, inline JavaScript and SVG; nothing is loaded from elsewhere) that
  draws the sites and their WAN links and renders ``/status.json`` every second;
- ``/status.json``: the figures the page shows, summed by :func:`summarize` (a pure function of the
  readings, which the tests feed by hand).

The launcher tells it what only the launcher knows: :meth:`StatusPage.process_exited` and
:meth:`StatusPage.run_ended`. The page goes on serving the last figures after the run ends, until
:meth:`StatusPage.close`. A node that does not answer is shown as unreachable with the time it was last
seen; polls never hold up the page.

Free of MXNet imports, like the rest of the launcher.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any, Deque, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from .. import metrics

log = logging.getLogger("geomx.launch.status")

#: The roles a node can have (the launcher's names for them).
ROLES = ("global_scheduler", "scheduler", "global_server", "local_server", "worker", "master_worker")

#: A local server's WAN link to global server ``N`` is named ``<its name>->serverN`` (geomx/node.py).
_WAN_LINK = re.compile(r"->server(\d+)$")


@dataclass(frozen=True)
class Node:
    """One process of the run, as the launcher knows it.

    ``site`` is its party (``party0``) or, for the global tier, ``central`` or ``gsN``; ``url`` is the
    address of its ``/metrics.json`` (empty: it serves no metrics and is shown, not polled).
    """

    name: str
    role: str
    site: str
    url: str = ""


def nodes_of(specs: Iterable[Any]) -> List[Node]:
    """The :class:`Node` of each of the launcher's :class:`~geomx.launch.topology.ProcessSpec`.

    A process whose environment sets ``GEOMX_METRICS_PORT`` is polled at the address its listener
    binds: ``GEOMX_BIND_HOST`` unless that is a wildcard, else its advertised ``DMLC_NODE_HOST``.
    """
    nodes = []
    for spec in specs:
        url = ""
        if spec.metrics_address is not None:
            host, port = spec.metrics_address
            url = f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics.json"
        nodes.append(Node(spec.name, spec.role, spec.party or spec.dc or "central", url))
    return nodes


# -- aggregation (pure) -----------------------------------------------------------------------------

class Seen(NamedTuple):
    """What the poller knows of one node: its latest reading, the one before, and whether the latest
    poll was answered (rates are given only then)."""

    reading: Optional[dict]
    previous: Optional[dict] = None
    fresh: bool = False


def samples(reading: Optional[dict], name: str) -> List[Tuple[Dict[str, str], float]]:
    """``name``'s samples in a ``/metrics.json`` reading: ``[(labels, value)]``."""
    if not reading:
        return []
    return [(labels, float(v)) for n, labels, v in reading.get("samples", ()) if n == name]


def total(reading: Optional[dict], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 if none; as geomx.metrics.value)."""
    return sum(v for ls, v in samples(reading, name) if all(ls.get(k) == want for k, want in labels.items()))


def has(reading: Optional[dict], name: str) -> bool:
    return bool(samples(reading, name))


def rate(seen: Seen, name: str, **labels: str) -> Optional[float]:
    """Per second, between the node's last two readings (by the node's own clock); None unless the node
    answered the latest poll. A counter that went down was reset (a restarted process): it counts from 0."""
    if not seen.fresh or seen.reading is None or seen.previous is None:
        return None
    dt = float(seen.reading["time"]) - float(seen.previous["time"])
    if dt <= 0:
        return None
    now, before = total(seen.reading, name, **labels), total(seen.previous, name, **labels)
    return (now - before if now >= before else now) / dt


def _sum(values: Iterable[Optional[float]]) -> Optional[float]:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _delta(seen: Seen, name: str, **labels: str) -> float:
    """The counter's growth since the previous reading (0 without one; a reset counts from 0)."""
    if not seen.fresh or seen.reading is None or seen.previous is None:
        return 0.0
    now, before = total(seen.reading, name, **labels), total(seen.previous, name, **labels)
    return now - before if now >= before else now


def peer_aliases(nodes: Sequence[Node], seen: Mapping[str, Seen]) -> Dict[str, str]:
    """Every name a node of a party may carry in a ``peer`` label -> its party: the launcher's name, the
    party itself and the name the node gives itself once ranked (``local_server1``)."""
    aliases: Dict[str, str] = {}
    for node in nodes:
        if not node.site.startswith("party"):
            continue
        aliases[node.site] = node.site
        aliases[node.name] = node.site
        reading = seen.get(node.name, Seen(None)).reading
        if reading and reading.get("node", {}).get("node"):
            aliases[reading["node"]["node"]] = node.site
    return aliases


def summarize(nodes: Sequence[Node], parties: Sequence[str], global_servers: int,
              seen: Mapping[str, Seen]) -> Dict[str, Any]:
    """The run's figures from every node's readings (``seen``: node name -> :class:`Seen`).

    - ``links``: one per party and global server, the bytes the party's local servers sent (``up``) and
      received (``down``) on their WAN link to that global server, and their rates;
    - ``wan``: the same summed over every link (``total``: both ways);
    - ``rounds``: the global servers' completed rounds (summed over keys), their rate, keys, mean round time;
    - ``waits``: which party each round waited for (``geomx_round_waited_for_total``), None when not measured;
    - ``training``: each worker's last reported loss, accuracy, steps done and planned (report_progress);
    - ``done``: the share of the run done (of the worker furthest behind), None where no worker said its length
      (the page adds ``eta_seconds``, the time to go: :class:`Eta`);
    - ``refusals``: every refused-messages counter by node, link, peer and reason.
    """
    by_role: Dict[str, List[Node]] = collections.defaultdict(list)
    for node in nodes:
        by_role[node.role].append(node)

    def seen_of(node: Node) -> Seen:
        return seen.get(node.name, Seen(None))

    aliases = peer_aliases(nodes, seen)

    # WAN links, as the parties' local servers count them.
    links: Dict[Tuple[str, str], Dict[str, Any]] = {}
    for p in parties:
        for g in range(global_servers):
            links[(p, str(g))] = _link(p, str(g))
    for node in by_role["local_server"]:
        s = seen_of(node)
        for labels, _ in samples(s.reading, "geomx_link_sent_bytes_total"):
            if labels.get("scope") != "wan":
                continue
            m = _WAN_LINK.search(labels.get("link", ""))
            g = m.group(1) if m else labels.get("link", "")
            link = links.setdefault((node.site, g), _link(node.site, g))
            name = labels.get("link", "")
            link["up_bytes"] = (link["up_bytes"] or 0) + total(s.reading, "geomx_link_sent_bytes_total", link=name)
            link["down_bytes"] = (link["down_bytes"] or 0) + total(
                s.reading, "geomx_link_received_bytes_total", link=name)
            link["up_bps"] = _sum([link["up_bps"], rate(s, "geomx_link_sent_bytes_total", link=name)])
            link["down_bps"] = _sum([link["down_bps"], rate(s, "geomx_link_received_bytes_total", link=name)])
            link["sources"].append(node.name)
    # What each global server received from each party, where it counts that (by peer).
    for node in by_role["global_server"]:
        s = seen_of(node)
        m = re.search(r"(\d+)$", node.name)
        g = m.group(1) if m else node.name
        for labels, v in samples(s.reading, "geomx_peer_received_bytes_total"):
            party = aliases.get(labels.get("peer", ""))
            if party is not None and labels.get("link") != "central-clients":
                link = links.setdefault((party, g), _link(party, g))
                link["received_by_global"] = (link["received_by_global"] or 0) + v
    link_list = sorted(links.values(), key=lambda k: (_natural(k["party"]), _natural(k["global_server"])))

    up = _sum(k["up_bytes"] for k in link_list)
    down = _sum(k["down_bytes"] for k in link_list)
    wan = {"up_bytes": up, "down_bytes": down,
           "total": None if up is None and down is None else (up or 0) + (down or 0),
           "up_bps": _sum(k["up_bps"] for k in link_list), "down_bps": _sum(k["down_bps"] for k in link_list)}

    # Rounds, on the global servers.
    gs_seen = [seen_of(n) for n in by_role["global_server"]]
    gs_read = [s for s in gs_seen if s.reading is not None]
    rounds_total = sum(total(s.reading, "geomx_rounds_total") for s in gs_read) if gs_read else None
    keys = sum(total(s.reading, "geomx_keys") for s in gs_read) if gs_read else None
    round_seconds = (sum(total(s.reading, "geomx_round_seconds_total") for s in gs_read)
                     if any(has(s.reading, "geomx_round_seconds_total") for s in gs_read) else None)
    rounds = {
        "total": rounds_total,
        "per_second": _sum(rate(s, "geomx_rounds_total") for s in gs_seen),
        "keys": keys,
        "per_key": rounds_total / keys if rounds_total is not None and keys else None,
        "mean_seconds": round_seconds / rounds_total if round_seconds is not None and rounds_total else None,
        "servers": [{"name": n.name, "rounds": total(seen_of(n).reading, "geomx_rounds_total")
                     if seen_of(n).reading else None, "per_second": rate(seen_of(n), "geomx_rounds_total")}
                    for n in by_role["global_server"]],
    }

    # Which party the rounds waited for.
    waits = None
    if any(has(s.reading, "geomx_round_waited_for_total") for s in gs_read):
        per: Dict[str, Dict[str, float]] = {p: {"rounds": 0.0, "recent": 0.0, "wait_seconds": 0.0} for p in parties}
        for s in gs_read:
            for labels, v in samples(s.reading, "geomx_round_waited_for_total"):
                peer = labels.get("peer", "")
                row = per.setdefault(aliases.get(peer, peer), {"rounds": 0.0, "recent": 0.0, "wait_seconds": 0.0})
                row["rounds"] += v
                row["recent"] += _delta(s, "geomx_round_waited_for_total", peer=peer)
            for labels, v in samples(s.reading, "geomx_round_wait_seconds_total"):
                peer = labels.get("peer", "")
                row = per.setdefault(aliases.get(peer, peer), {"rounds": 0.0, "recent": 0.0, "wait_seconds": 0.0})
                row["wait_seconds"] += v
        counted = sum(r["rounds"] for r in per.values())
        for row in per.values():
            row["share"] = row["rounds"] / counted if counted else 0.0
            row["mean_wait_seconds"] = row["wait_seconds"] / row["rounds"] if row["rounds"] else None
        recent = {p: r["recent"] for p, r in per.items() if r["recent"] > 0}
        waits = {
            "parties": per,
            "slowest": max(per, key=lambda p: (per[p]["rounds"], p)) if counted else None,
            "slowest_recent": max(recent, key=lambda p: (recent[p], p)) if recent else None,
        }

    training = {}
    for node in by_role["worker"]:
        reading = seen_of(node).reading
        training[node.name] = {name: total(reading, metric) if has(reading, metric) else None
                               for name, metric in (("loss", "geomx_training_loss"),
                                                    ("accuracy", "geomx_training_accuracy"),
                                                    ("steps", "geomx_training_steps"),
                                                    ("planned", "geomx_training_steps_planned"))}
    # The run's share done: that of the worker furthest behind, among those that said their length.
    shares = [min(t["steps"] or 0.0, t["planned"]) / t["planned"] for t in training.values() if t["planned"]]

    refusals = []
    for node in nodes:
        for labels, v in samples(seen_of(node).reading, "geomx_refused_messages_total"):
            refusals.append({"node": node.name, "link": labels.get("link", ""), "peer": labels.get("peer", ""),
                             "reason": labels.get("reason", ""), "count": v})

    return {"links": link_list, "wan": wan, "rounds": rounds, "waits": waits, "training": training,
            "done": min(shares) if shares else None, "refusals": refusals,
            "refusals_total": sum(r["count"] for r in refusals)}


def _link(party: str, g: str) -> Dict[str, Any]:
    return {"id": f"{party}->gs{g}", "party": party, "global_server": g, "up_bytes": None, "down_bytes": None,
            "up_bps": None, "down_bps": None, "received_by_global": None, "sources": []}


def _natural(text: str) -> Tuple:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


# -- history ----------------------------------------------------------------------------------------

class Series:
    """``[time, value]`` points, at most ``limit``: when full, every other point goes (the whole run
    stays in view at half the resolution)."""

    def __init__(self, limit: int) -> None:
        self.limit = max(4, limit)
        self.points: List[List[float]] = []
        self._stride = 1
        self._skipped = 0

    def add(self, t: float, v: Optional[float]) -> None:
        if v is None:
            return
        self._skipped += 1
        if self._skipped < self._stride:
            return
        self._skipped = 0
        self.points.append([round(t, 3), v])
        if len(self.points) > self.limit:
            self.points = self.points[::2]
            self._stride *= 2


class Eta:
    """The time left, from the share done (``figures["done"]``) and how fast it grew since it was first
    seen: a run's start (processes starting, the first rounds) does not count against its speed."""

    def __init__(self) -> None:
        self._first: Optional[tuple] = None  # (time, share) when a share was first seen

    def update(self, now: float, done: Optional[float]) -> Optional[float]:
        """Seconds left at ``now`` with ``done`` (0 to 1) of the run done; None until it can tell."""
        if done is None:
            return None
        if done >= 1.0:
            return 0.0
        if self._first is None:
            self._first = (now, done)
            return None
        t0, d0 = self._first
        if done < d0:  # a slower worker's first report: the pace is measured from here
            self._first = (now, done)
            return None
        if done == d0 or now <= t0:
            return None
        return (now - t0) / (done - d0) * (1.0 - done)


# -- the page's server ------------------------------------------------------------------------------

class StatusPage:
    """Polls ``nodes`` and serves the run's status page on ``host:port`` (0: any free port; see ``port``).

    ``port`` None: no page, the figures only (:meth:`status`; the launcher's progress line).
    ``parties`` (``["party0", "party1"]``) and ``global_servers`` (their number) are the topology's shape:
    the sites and WAN links drawn before any node answers. ``interval`` is the time between polls,
    ``timeout`` a poll's limit per node, ``history`` the points each chart keeps. Polling and serving
    start at once, each in a daemon thread.
    """

    def __init__(self, nodes: Sequence[Node], parties: Sequence[str], global_servers: int,
                 host: str = "127.0.0.1", port: Optional[int] = 0, *, interval: float = 1.0, timeout: float = 1.5,
                 history: int = 600, title: str = "geomx run") -> None:
        for node in nodes:
            if node.role not in ROLES:
                raise ValueError(f"node {node.name}: unknown role {node.role!r} (one of {', '.join(ROLES)})")
        self.nodes = list(nodes)
        self.parties = list(parties)
        self.global_servers = int(global_servers)
        self.interval = interval
        self.timeout = timeout
        self.title = title
        self._lock = threading.Lock()
        self._seen: Dict[str, Seen] = {n.name: Seen(None) for n in self.nodes}
        self._state: Dict[str, Dict[str, Any]] = {
            n.name: {"state": "waiting" if n.url else "not polled", "last_seen": None, "error": "", "stale": False,
                     "failures": 0, "exit": None} for n in self.nodes}
        self._eta = Eta()  # the time to go, from the share done as the polls see it grow
        self._figures: Dict[str, Any] = self._summarize(with_eta=False)
        self._reported_refusals: Dict[Tuple[str, str, str, str], float] = {}
        self._history = {k: Series(history) for k in ("rounds_per_second", "wan_up_bps", "wan_down_bps")}
        self._training: Dict[str, Dict[str, Series]] = {
            n.name: {"loss": Series(history), "accuracy": Series(history)} for n in self.nodes if n.role == "worker"}
        self._events: Deque[Dict[str, Any]] = collections.deque(maxlen=200)
        self._run: Dict[str, Any] = {"state": "starting", "status": None, "message": "", "ok": None,
                                     "started": time.time(), "ended": None}
        self._last_poll: Optional[float] = None
        self._stop = threading.Event()
        self._polled = [n for n in self.nodes if n.url]
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, min(32, len(self._polled))), thread_name_prefix="geomx-status-poll")

        self.host = host
        self._poll_thread = threading.Thread(target=self._poll_forever, name="geomx-status-poller", daemon=True)
        self._poll_thread.start()
        self.listener: Optional[metrics.HTTPListener] = None
        self.port = 0
        if port is None:  # figures only (the launcher's progress line): nothing served
            return
        self.listener = metrics.HTTPListener(host, port, self._answer, "the status page serves / and /status.json",
                                             "geomx-status-page", headers=(("Cache-Control", "no-store"),))
        self.port = self.listener.port
        log.info("status page on %s (%d of %d processes polled)", self.url, len(self._polled), len(self.nodes))

    def _summarize(self, with_eta: bool = True) -> Dict[str, Any]:
        """The run's figures from the latest readings, with the time to go (none before or after the run)."""
        figures = summarize(self.nodes, self.parties, self.global_servers, self._seen)
        figures["eta_seconds"] = self._eta.update(time.monotonic(), figures["done"]) if with_eta else None
        return figures

    def _answer(self, path: str) -> Optional[Tuple[bytes, str]]:
        if path == "/status.json":
            return json.dumps(self.status()).encode(), "application/json"
        if path in ("/", "/index.html"):
            return self.page().encode(), "text/html; charset=utf-8"
        return None

    @classmethod
    def of_processes(cls, specs: Sequence[Any], host: str = "127.0.0.1", port: Optional[int] = 0,
                     **kwargs: Any) -> "StatusPage":
        """The page of the launcher's process list (its parties and global servers read from it)."""
        nodes = nodes_of(specs)
        parties = sorted({n.site for n in nodes if n.site.startswith("party")}, key=_natural)
        global_servers = sum(1 for n in nodes if n.role == "global_server")
        return cls(nodes, parties, global_servers, host, port, **kwargs)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "*", "0.0.0.0") else self.host  # noqa: S104
        return f"http://{host}:{self.port}/"

    # ---- what the launcher tells it
    def process_exited(self, name: str, code: int, reason: str = "") -> None:
        """Process ``name`` exited with ``code`` (``reason``: the launcher's words, e.g. a signal's name)."""
        now = time.time()
        with self._lock:
            state = self._state.get(name)
            if state is not None:
                state.update(state="exited", exit={"code": code, "reason": reason, "time": now})
            text = f"{name} exited with code {code}" + (f": {reason}" if reason else "")
            self._event(now, "exit", name, text, "info" if code == 0 else "error")

    def run_ended(self, status: int, message: str = "") -> None:
        """The run is over with the launcher's exit status (0: success) and why. Polling stops; the page
        keeps the last figures and goes on serving until :meth:`close`."""
        now = time.time()
        with self._lock:
            self._run.update(state="ended", status=status, message=message, ok=status == 0, ended=now)
            # Nothing flows any more: no rates; the processes the launcher did not report were stopped with it.
            self._seen = {name: Seen(s.reading, s.previous, False) for name, s in self._seen.items()}
            self._figures = self._summarize(with_eta=False)
            for state in self._state.values():
                if state["state"] in ("up", "stale", "unreachable", "waiting"):
                    state["state"] = "stopped"
            text = f"the run ended with status {status}" + (f": {message}" if message else "")
            self._event(now, "run", "", text, "info" if status == 0 else "error")
        self._stop.set()

    def close(self) -> None:
        """Stop polling and serving."""
        self._stop.set()
        if self.listener is not None:
            self.listener.close()
        self._poll_thread.join(timeout=self.timeout + 1)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "StatusPage":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- what it serves
    def status(self) -> Dict[str, Any]:
        """Everything ``/status.json`` holds (a copy: the poller goes on)."""
        with self._lock:
            nodes = []
            for n in self.nodes:
                reading = self._seen[n.name].reading
                nodes.append(dict(asdict(n), **self._state[n.name],
                                  samples=reading["samples"] if reading else []))
            out = {
                "title": self.title,
                "time": time.time(),
                "last_poll": self._last_poll,
                "interval": self.interval,
                "run": dict(self._run),
                "shape": {"parties": self.parties, "global_servers": self.global_servers},
                "nodes": nodes,
                "history": {k: list(s.points) for k, s in self._history.items()},
                "training_history": {w: {k: list(s.points) for k, s in series.items()}
                                     for w, series in self._training.items()},
                "events": list(self._events),
            }
            out.update(self._figures)  # replaced whole by each poll, never changed in place
        return out

    def page(self) -> str:
        """The HTML page, with the present status in it (shown before its first poll of /status.json)."""
        initial = json.dumps(self.status()).replace("<", "\\u003c")
        return (PAGE.replace("__TITLE__", _html_escape(self.title))
                .replace("__INITIAL__", initial))

    # ---- polling
    def _poll_forever(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - the page must outlive any one bad reading
                log.exception("status page: a poll failed")
            self._stop.wait(max(0.05, self.interval - (time.monotonic() - start)))

    def poll_once(self) -> None:
        """Read every node once (each within ``timeout``), then sum the figures."""
        started = time.time()  # the figures' time: no reading of this poll is older
        futures = {n.name: self._pool.submit(_fetch, n.url, self.timeout) for n in self._polled}
        answers: Dict[str, Tuple[Optional[dict], str]] = {}
        for name, fut in futures.items():
            try:
                answers[name] = (fut.result(timeout=self.timeout + 1), "")
            except Exception as exc:  # noqa: BLE001 - any failure is "unreachable", with its words
                answers[name] = (None, _why(exc))
        self._update(answers, started)

    def _update(self, answers: Mapping[str, Tuple[Optional[dict], str]], now: float) -> None:
        with self._lock:
            if self._run["state"] == "ended":
                return  # it ended while this poll ran: its processes are gone, the figures stay as they were
            for name, (reading, error) in answers.items():
                seen, state = self._seen[name], self._state[name]
                if reading is None:
                    self._seen[name] = Seen(seen.reading, seen.previous, False)
                    state.update(error=error, failures=state["failures"] + 1)
                    # Twice in a row: a process that exits is silent for one poll before the launcher says so.
                    if state["state"] in ("up", "stale") and state["failures"] >= 2:
                        state["state"] = "unreachable"
                        self._event(now, "node", name, f"{name} does not answer: {error}", "warning")
                    continue
                stale = total(reading, "geomx_metrics_stale") > 0
                if stale and seen.reading is not None:
                    # The node's last reading again, under a new time: no figure of it has changed and it is
                    # no base for a rate; the one before it is.
                    self._seen[name] = Seen(seen.reading, seen.previous, False)
                else:
                    self._seen[name] = Seen(reading, seen.reading, not stale)
                state.update(last_seen=now, error="", stale=stale, failures=0)
                if self._run["state"] == "starting":
                    self._run["state"] = "running"
                exited = state["state"] == "exited"
                if exited and now < state["exit"]["time"] + self.interval:
                    continue  # a poll that began before the exit: still exited
                if exited or state["state"] == "unreachable":
                    self._event(now, "node", name, f"{name} answers again", "info")  # e.g. restarted
                state["state"] = "stale" if stale else "up"
            self._figures = self._summarize()
            self._last_poll = now
            self._record(now)

    def _record(self, now: float) -> None:
        f = self._figures
        self._history["rounds_per_second"].add(now, f["rounds"]["per_second"])
        self._history["wan_up_bps"].add(now, f["wan"]["up_bps"])
        self._history["wan_down_bps"].add(now, f["wan"]["down_bps"])
        for worker, figures in f["training"].items():
            if self._seen[worker].fresh:
                for k in ("loss", "accuracy"):
                    self._training[worker][k].add(now, figures[k])
        for r in f["refusals"]:
            key = (r["node"], r["link"], r["peer"], r["reason"])
            before = self._reported_refusals.get(key, 0.0)
            if r["count"] > before:
                self._event(now, "refusal", r["node"],
                            f"{r['node']} refused {r['count'] - before:g} message(s) from {r['peer'] or '?'} on "
                            f"{r['link']}: {r['reason']}", "warning")
            self._reported_refusals[key] = r["count"]

    def _event(self, t: float, kind: str, node: str, text: str, severity: str) -> None:
        self._events.appendleft({"time": t, "kind": kind, "node": node, "text": text, "severity": severity})


def _fetch(url: str, timeout: float) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as reply:  # noqa: S310 - the launcher's own nodes
        reading = json.load(reply)
    if not isinstance(reading, dict) or "samples" not in reading or "time" not in reading:
        raise ValueError("not a geomx /metrics.json reading")
    return reading


def _why(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
    if isinstance(exc, (TimeoutError, concurrent.futures.TimeoutError)):
        return "timed out"
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def _html_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


# The page: a skeleton, its style and the script that draws /status.json into it. Everything the page
# needs is here (the run's machines may have no way out). Text from the run is set with textContent.
PAGE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
:root { --ink:#1f2933; --mute:#6b7785; --line:#d9dee4; --up:#2f6fdf; --down:#d9822b; --ok:#2e9d5b;
        --bad:#d64545; --warn:#c98a12; --bg:#f6f7f9; }
* { box-sizing:border-box; }
body { margin:0; font:13px/1.35 system-ui, -apple-system, "Segoe UI", sans-serif; color:var(--ink);
       background:var(--bg); }
header { display:flex; align-items:center; gap:14px; padding:8px 16px; background:#fff;
         border-bottom:1px solid var(--line); }
header h1 { font-size:16px; margin:0; font-weight:600; }
.badge { padding:2px 8px; border-radius:10px; font-weight:600; color:#fff; background:var(--mute); }
.badge[data-state=running] { background:var(--ok); } .badge[data-state=ended][data-ok=false] { background:var(--bad); }
.badge[data-state=ended][data-ok=true] { background:var(--up); }
#connection { color:var(--bad); } .mute { color:var(--mute); }
#run-end { margin:8px 16px 0; padding:8px 12px; border-radius:6px; display:none; }
#run-end.ok { display:block; background:#e7f0fd; border:1px solid #b7cdf5; }
#run-end.bad { display:block; background:#fdecec; border:1px solid #f1b5b5; }
main { display:grid; grid-template-columns: 600px 1fr; gap:12px; padding:12px 16px; }
.card { background:#fff; border:1px solid var(--line); border-radius:6px; padding:8px 10px; }
.card h2 { font-size:12px; text-transform:uppercase; letter-spacing:.04em; color:var(--mute); margin:0 0 6px; }
.figures { display:grid; grid-template-columns: repeat(6, 1fr); gap:8px; grid-column: 1 / span 2; }
.figure .v { font-size:18px; font-weight:600; white-space:nowrap; overflow:hidden; text-overflow:ellipsis; }
.figure .l { color:var(--mute); font-size:11px; }
.charts { display:grid; grid-template-columns: 1fr 1fr; gap:8px; }
svg text { font:11px system-ui, sans-serif; fill:var(--ink); }
svg .site-box { fill:#fbfcfd; stroke:#9aa5b1; } svg .global-box { fill:#f3f6fb; stroke:#7c8da6; }
svg .node-dot { stroke:#fff; stroke-width:1.5; }
table { border-collapse:collapse; width:100%; }
td, th { text-align:left; padding:2px 6px; border-bottom:1px solid var(--line); }
th { color:var(--mute); font-weight:500; font-size:11px; }
.st-up { color:var(--ok); } .st-stale { color:var(--warn); } .st-unreachable, .st-exited-bad { color:var(--bad); }
.st-waiting, .st-exited, .st-not, .st-stopped { color:var(--mute); }
#events { max-height:170px; overflow:auto; margin:0; padding:0; list-style:none; }
#events li { padding:2px 0; border-bottom:1px dotted var(--line); }
#events li.error { color:var(--bad); } #events li.warning { color:var(--warn); }
.bar { height:9px; background:var(--down); border-radius:2px; }
details summary { cursor:pointer; color:var(--mute); }
</style></head>
<body>
<header><h1 id="title">__TITLE__</h1><span class="badge" id="run-state" data-state="starting">starting</span>
<span class="mute" id="elapsed"></span><span class="mute" id="updated"></span><span id="connection"></span>
<span id="status-time" data-value="" hidden></span></header>
<div id="run-end"></div>
<main>
<section class="figures">
 <div class="card figure"><div class="v" id="wan-bytes-total" data-value="">–</div>
  <div class="l">WAN bytes in total (both ways)</div></div>
 <div class="card figure"><div class="v" id="wan-throughput" data-up="" data-down="">–</div>
  <div class="l">WAN now: up (to the global tier), down</div></div>
 <div class="card figure"><div class="v" id="rounds-total" data-value="">–</div>
  <div class="l">rounds (global servers, all keys)<span id="rounds-per-key"></span></div></div>
 <div class="card figure"><div class="v" id="rounds-per-second" data-value="">–</div>
  <div class="l">rounds per second</div></div>
 <div class="card figure"><div class="v" id="slowest-party" data-value="">–</div>
  <div class="l">slowest party (rounds waited for)</div></div>
 <div class="card figure"><div class="v" id="refusals-total" data-value="">–</div>
  <div class="l">messages refused</div></div>
</section>
<section>
 <div class="card"><h2>Sites and WAN links</h2>
  <svg id="topology" width="576" height="330" role="img" aria-label="topology"></svg></div>
 <div class="card" style="margin-top:8px"><h2>Which party the rounds waited for</h2><div id="waits"></div></div>
 <div class="card" style="margin-top:8px"><h2>Processes</h2><table id="nodes"></table></div>
</section>
<section>
 <div class="charts">
  <div class="card"><h2>Rounds per second</h2><svg id="chart-rounds" width="280" height="140"></svg></div>
  <div class="card"><h2>WAN throughput (bytes/s)</h2><svg id="chart-wan" width="280" height="140"></svg></div>
  <div class="card"><h2>Training loss</h2><svg id="chart-loss" width="280" height="140"></svg></div>
  <div class="card"><h2>Accuracy</h2><svg id="chart-accuracy" width="280" height="140"></svg></div>
 </div>
 <div class="card" style="margin-top:8px"><h2>WAN links</h2><table id="links"></table></div>
 <div class="card" style="margin-top:8px"><h2>Events: exits, refusals, failures</h2><ul id="events"></ul></div>
 <div class="card" style="margin-top:8px"><h2>Every metric</h2><div id="raw"></div></div>
</section>
</main>
<script id="initial" type="application/json">__INITIAL__</script>
<script>
"use strict";
const SVGNS = "http://www.w3.org/2000/svg";
const PALETTE = ["#2f6fdf", "#d9822b", "#2e9d5b", "#9b51e0", "#d64545", "#0f9fb5", "#8a6d3b", "#e05297"];
let lastOk = null, failingSince = null, current = null;

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(String(k)));
  return e;
}
function sv(tag, attrs, text) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function num(v) { return v === null || v === undefined ? "" : String(v); }
function bytes(v) {
  if (v === null || v === undefined) return "–";
  const units = ["B", "kB", "MB", "GB", "TB"]; let i = 0;
  while (Math.abs(v) >= 1000 && i < units.length - 1) { v /= 1000; i++; }
  return (i ? v.toFixed(v < 10 ? 2 : 1) : v.toFixed(0)) + " " + units[i];
}
function perSec(v) { return v === null || v === undefined ? "–" : bytes(v) + "/s"; }
function fixed(v, d) { return v === null || v === undefined ? "–" : Number(v).toFixed(d); }
function clock(t) { return t ? new Date(t * 1000).toTimeString().slice(0, 8) : "never"; }
function ago(t, now) { return t ? Math.max(0, Math.round(now - t)) + " s ago" : "never"; }
function color(i) { return PALETTE[i % PALETTE.length]; }
function setFigure(id, value, text) {
  const e = document.getElementById(id); e.dataset.value = num(value); e.textContent = text;
}

function render(s) {
  current = s;
  const run = s.run, now = s.time;
  const badge = document.getElementById("run-state");
  badge.dataset.state = run.state; badge.dataset.ok = String(run.ok);
  badge.textContent = run.state === "ended" ? (run.ok ? "finished" : "failed (status " + run.status + ")") : run.state;
  const togo = s.eta_seconds === null || run.state === "ended" ? "" : ", " + Math.round(s.eta_seconds) + " s to go";
  document.getElementById("elapsed").textContent = "running for " + Math.round((run.ended || now) - run.started) + " s"
      + (s.done === null || s.done === undefined ? "" : ", " + Math.round(100 * s.done) + " % done" + togo);
  document.getElementById("updated").textContent = "figures of " + clock(s.last_poll);
  document.getElementById("status-time").dataset.value = String(s.time);
  const end = document.getElementById("run-end");
  end.className = run.state === "ended" ? (run.ok ? "ok" : "bad") : "";
  end.dataset.status = num(run.status);
  end.textContent = run.state === "ended"
      ? "The run ended at " + clock(run.ended) + " with status " + run.status + (run.message ? ": " + run.message : "")
        + ". The figures are those of its last poll." : "";

  setFigure("wan-bytes-total", s.wan.total, bytes(s.wan.total));
  const thr = document.getElementById("wan-throughput");
  thr.dataset.up = num(s.wan.up_bps); thr.dataset.down = num(s.wan.down_bps);
  thr.textContent = "↑ " + perSec(s.wan.up_bps) + "  ↓ " + perSec(s.wan.down_bps);
  setFigure("rounds-total", s.rounds.total, s.rounds.total === null ? "–" : String(s.rounds.total));
  document.getElementById("rounds-per-key").textContent =
      s.rounds.per_key === null ? "" : ": " + s.rounds.per_key.toFixed(0) + " per key";
  setFigure("rounds-per-second", s.rounds.per_second, fixed(s.rounds.per_second, 1));
  const slow = s.waits ? (s.waits.slowest_recent || s.waits.slowest) : null;
  setFigure("slowest-party", slow, s.waits ? (slow || "none yet") : "not measured");
  setFigure("refusals-total", s.refusals_total, String(s.refusals_total));

  drawTopology(s);
  drawWaits(s);
  drawNodes(s);
  drawLinks(s);
  drawEvents(s);
  drawRaw(s);
  const t0 = run.started;
  chart("chart-rounds", [{name: "rounds/s", points: s.history.rounds_per_second}], t0);
  chart("chart-wan", [{name: "up", points: s.history.wan_up_bps, color: "#2f6fdf"},
                      {name: "down", points: s.history.wan_down_bps, color: "#d9822b"}], t0, bytes);
  const workers = Object.keys(s.training_history).sort();
  const per = k => workers.map((w, i) => ({name: w, points: s.training_history[w][k], color: color(i)}));
  chart("chart-loss", per("loss"), t0, null, "none reported (kv.report_loss)");
  chart("chart-accuracy", per("accuracy"), t0, null, "none reported (kv.report_accuracy)");
}

function nodeColor(n) {
  if (n.state === "up") return "#2e9d5b";
  if (n.state === "stale") return "#c98a12";
  if (n.state === "unreachable") return "#d64545";
  if (n.state === "exited") return n.exit && n.exit.code !== 0 ? "#d64545" : "#9aa5b1";
  return "#c3cad3";
}

function nodeDot(parent, n, x, y, label) {
  const g = sv("g", {"data-node": n.name, "data-state": n.state});
  g.append(sv("circle", {cx: x, cy: y - 4, r: 5, fill: nodeColor(n), "class": "node-dot"}));
  g.append(sv("text", {x: x + 9, y: y}, label));
  g.append(sv("title", {}, n.name + ": " + n.state));
  parent.append(g);
}

function drawTopology(s) {
  const svg = document.getElementById("topology"); svg.replaceChildren();
  const W = +svg.getAttribute("width"), P = s.shape.parties, G = Math.max(1, s.shape.global_servers);
  // The global tier across the top: its global servers as large dots, its other processes listed at the right.
  const globalNodes = s.nodes.filter(n => !P.includes(n.site));
  const others = globalNodes.filter(n => n.role !== "global_server");
  const listW = others.length ? 190 : 0, gx = 10, gy = 6, gw = W - 20;
  const gh = Math.max(92, 26 + 15 * Math.ceil(others.length / (others.length > 5 ? 2 : 1)));
  const tier = sv("g", {"class": "site", "data-site": "global"});
  tier.append(sv("rect", {x: gx, y: gy, width: gw, height: gh, rx: 8, "class": "global-box"}));
  tier.append(sv("text", {x: gx + 8, y: gy + 15, "font-weight": 600}, "global tier"));
  const gsPos = {};
  const servers = globalNodes.filter(n => n.role === "global_server");
  for (let g = 0; g < G; g++) gsPos[String(g)] = [gx + (gw - listW) * (g + 0.5) / G, gy + gh / 2 - 4];
  servers.forEach((n, i) => {
    const [x, y] = gsPos[String(i)] || gsPos["0"];
    const g = sv("g", {"data-node": n.name, "data-state": n.state});
    g.append(sv("circle", {cx: x, cy: y, r: 13, fill: nodeColor(n), "class": "node-dot"}));
    g.append(sv("text", {x: x, y: y + 28, "text-anchor": "middle"}, n.name));
    g.append(sv("title", {}, n.name + ": " + n.state));
    tier.append(g);
  });
  const cols = others.length > 5 ? 2 : 1;
  others.forEach((n, j) => nodeDot(tier, n, gx + gw - listW + 8 + (j % cols) * (listW / cols),
                                   gy + 32 + 15 * Math.floor(j / cols), n.name));
  // The parties along the bottom.
  const most = Math.max(1, ...P.map(p => s.nodes.filter(n => n.site === p).length));
  const pw = Math.min(200, W / Math.max(1, P.length) - 12), ph = 30 + 16 * Math.ceil(most / 2);
  const py = gy + gh + 120;
  svg.setAttribute("height", py + ph + 6);
  const links = sv("g", {id: "links-drawn"});
  svg.append(links, tier);
  const partyPos = {};
  P.forEach((p, i) => {
    const x = (W / P.length) * (i + 0.5) - pw / 2;
    partyPos[p] = [x + pw / 2, py];
    const g = sv("g", {"class": "site", "data-site": p});
    g.append(sv("rect", {x: x, y: py, width: pw, height: ph, rx: 8, "class": "site-box"}));
    g.append(sv("text", {x: x + 8, y: py + 15, "font-weight": 600}, p));
    s.nodes.filter(n => n.site === p).forEach((n, j) =>
      nodeDot(g, n, x + 12 + (j % 2) * (pw / 2), py + 34 + 16 * Math.floor(j / 2), n.name.replace(p + "/", "")));
    svg.append(g);
  });
  // One line per party and global server, as wide as its share of the WAN traffic now.
  const maxBps = Math.max(1, ...s.links.map(k => (k.up_bps || 0) + (k.down_bps || 0)));
  s.links.forEach(k => {
    const a = partyPos[k.party], b = gsPos[k.global_server];
    if (!a || !b) return;
    const g = sv("g", {"class": "link", "data-link": k.id, "data-up-bytes": num(k.up_bytes),
                       "data-down-bytes": num(k.down_bytes), "data-up-bps": num(k.up_bps),
                       "data-down-bps": num(k.down_bps)});
    const live = k.up_bps !== null || k.down_bps !== null;
    g.append(sv("line", {x1: a[0], y1: a[1], x2: b[0], y2: b[1] + 13, stroke: live ? "#5b7db1" : "#c3cad3",
                         "stroke-width": 1.5 + 6 * ((k.up_bps || 0) + (k.down_bps || 0)) / maxBps,
                         "stroke-dasharray": live ? "" : "5 4"}));
    // The label outside the line (on the side it leans away from), its last row at a point of the line
    // near the party; a party's lines to several global servers have their labels at different heights.
    const f = 0.22 + (G > 1 ? 0.4 * (+k.global_server) / (G - 1) : 0);
    const mx = a[0] + (b[0] - a[0]) * f, my = a[1] + (b[1] + 13 - a[1]) * f - 26;
    const right = b[0] <= a[0], lx = right ? mx + 10 : mx - 10;
    const label = sv("text", {x: lx, y: my, "text-anchor": right ? "start" : "end"});
    label.append(sv("tspan", {fill: "#2f6fdf", x: lx}, "↑ " + perSec(k.up_bps)));
    label.append(sv("tspan", {fill: "#d9822b", x: lx, dy: 13}, "↓ " + perSec(k.down_bps)));
    label.append(sv("tspan", {fill: "#6b7785", x: lx, dy: 13},
                    bytes((k.up_bytes || 0) + (k.down_bytes || 0)) + " in all"));
    g.append(label);
    links.append(g);
  });
}

function drawWaits(s) {
  const box = document.getElementById("waits"); box.replaceChildren();
  if (!s.waits) {
    box.append(el("span", {"class": "mute"}, "Not measured by these servers (geomx_round_waited_for_total absent)."));
    return;
  }
  const t = el("table", {}, el("tr", {}, el("th", {}, "party"), el("th", {}, "rounds it was last"),
                               el("th", {}, "share"), el("th", {}, "last poll"), el("th", {}, "mean wait")));
  Object.keys(s.waits.parties).sort().forEach(p => {
    const r = s.waits.parties[p];
    const bar = el("div", {"class": "bar", style: "width:" + Math.round(100 * r.share) + "px"});
    t.append(el("tr", {"data-party": p, "data-rounds": num(r.rounds)}, el("td", {}, p), el("td", {}, String(r.rounds)),
                el("td", {}, bar), el("td", {}, String(r.recent)),
                el("td", {}, r.mean_wait_seconds === null ? "–" : (1000 * r.mean_wait_seconds).toFixed(1) + " ms")));
  });
  box.append(t);
}

function drawNodes(s) {
  const t = document.getElementById("nodes"); t.replaceChildren();
  t.append(el("tr", {}, el("th", {}, "process"), el("th", {}, "role"), el("th", {}, "site"), el("th", {}, "state"),
                el("th", {}, "last seen")));
  for (const n of s.nodes) {
    let state = n.state, cls = "st-" + n.state.split(" ")[0];
    if (n.state === "exited") {
      state = "exited, code " + n.exit.code + (n.exit.reason ? ": " + n.exit.reason : "");
      if (n.exit.code !== 0) cls = "st-exited-bad";
    } else if (n.state === "unreachable") state = "unreachable" + (n.error ? " (" + n.error + ")" : "");
    else if (n.state === "stopped") state = "stopped with the run";
    t.append(el("tr", {id: "node-" + n.name, "data-state": n.state}, el("td", {}, n.name), el("td", {}, n.role),
                el("td", {}, n.site), el("td", {"class": cls}, state),
                el("td", {}, n.last_seen ? (n.state === "unreachable" ? ago(n.last_seen, s.time) + ", at " : "")
                                 + clock(n.last_seen) : "never")));
  }
}

function drawLinks(s) {
  const t = document.getElementById("links"); t.replaceChildren();
  t.append(el("tr", {}, el("th", {}, "link"), el("th", {}, "up now"), el("th", {}, "down now"),
                el("th", {}, "sent up"), el("th", {}, "received down")));
  for (const k of s.links)
    t.append(el("tr", {"data-link": k.id}, el("td", {}, k.party + " ⇄ global server " + k.global_server),
                el("td", {}, perSec(k.up_bps)), el("td", {}, perSec(k.down_bps)),
                el("td", {}, bytes(k.up_bytes)), el("td", {}, bytes(k.down_bytes))));
}

function drawEvents(s) {
  const ul = document.getElementById("events"); ul.replaceChildren();
  if (!s.events.length) ul.append(el("li", {"class": "mute"}, "nothing yet"));
  for (const e of s.events.slice(0, 60))
    ul.append(el("li", {"class": e.severity, "data-kind": e.kind}, clock(e.time) + "  " + e.text));
}

function drawRaw(s) {
  const box = document.getElementById("raw");
  const open = new Set([...box.querySelectorAll("details[open]")].map(d => d.dataset.node));
  box.replaceChildren();
  for (const n of s.nodes) {
    if (!n.samples.length) continue;
    const d = el("details", {"data-node": n.name}); if (open.has(n.name)) d.open = true;
    d.append(el("summary", {}, n.name + " (" + n.samples.length + " samples)"));
    const t = el("table", {});
    for (const [name, labels, v] of n.samples) {
      const ls = Object.entries(labels).map(([k, x]) => k + "=" + x).join(", ");
      t.append(el("tr", {}, el("td", {}, name), el("td", {}, ls), el("td", {}, String(v))));
    }
    d.append(t); box.append(d);
  }
}

function chart(id, series, t0, fmt, empty) {
  const svg = document.getElementById(id); svg.replaceChildren();
  const W = +svg.getAttribute("width"), H = +svg.getAttribute("height"), R = 6, T = 6;
  const B = 18 + 13 * Math.ceil(series.length / 2);
  const pts = series.flatMap(x => x.points);
  fmt = fmt || (v => Math.abs(v) >= 100 ? v.toFixed(0) : v === 0 || Math.abs(v) >= 0.01 ? v.toPrecision(3)
                                                                                         : v.toExponential(1));
  if (!pts.length) {
    svg.append(sv("text", {x: W / 2, y: H / 2, "text-anchor": "middle", fill: "#6b7785"}, empty || "no data yet"));
    return;
  }
  const ts = pts.map(p => p[0]), vs = pts.map(p => p[1]);
  let x0 = Math.min(...ts), x1 = Math.max(...ts), y0 = Math.min(0, ...vs), y1 = Math.max(...vs);
  if (x1 === x0) x1 = x0 + 1; if (y1 === y0) y1 = y0 + 1;
  const L = 12 + 6.5 * Math.max(fmt(y0).length, fmt(y1).length);  // room for the axis' labels
  const X = t => L + (W - L - R) * (t - x0) / (x1 - x0), Y = v => T + (H - T - B) * (1 - (v - y0) / (y1 - y0));
  svg.append(sv("line", {x1: L, y1: T, x2: L, y2: H - B, stroke: "#d9dee4"}));
  svg.append(sv("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#d9dee4"}));
  svg.append(sv("text", {x: L - 4, y: T + 8, "text-anchor": "end"}, fmt(y1)));
  svg.append(sv("text", {x: L - 4, y: H - B, "text-anchor": "end"}, fmt(y0)));
  svg.append(sv("text", {x: L, y: H - B + 12}, Math.round(x0 - t0) + " s"));
  svg.append(sv("text", {x: W - R, y: H - B + 12, "text-anchor": "end"}, Math.round(x1 - t0) + " s"));
  series.forEach((x, i) => {
    const c = x.color || color(i);
    if (x.points.length) svg.append(sv("polyline", {fill: "none", stroke: c, "stroke-width": 1.6,
        points: x.points.map(p => X(p[0]).toFixed(1) + "," + Y(p[1]).toFixed(1)).join(" ")}));
    const last = x.points.length ? x.points[x.points.length - 1][1] : null;
    svg.append(sv("text", {x: 6 + (W / 2) * (i % 2), y: H - B + 26 + 13 * Math.floor(i / 2), fill: c},
                  x.name + (last === null ? "" : ": " + fmt(last))));
  });
}

function poll() {
  fetch("status.json", {cache: "no-store"}).then(r => {
    if (!r.ok) throw new Error("HTTP " + r.status);
    return r.json();
  }).then(s => {
    failingSince = null; lastOk = Date.now();
    document.getElementById("connection").textContent = "";
    render(s);
  }).catch(err => {
    if (failingSince === null) failingSince = new Date();
    document.getElementById("connection").textContent =
        "the status server does not answer since " + failingSince.toTimeString().slice(0, 8) +
        " (" + err.message + "); showing its last figures";
  });
}

render(JSON.parse(document.getElementById("initial").textContent));
poll();
setInterval(poll, 1000);
</script>
</body></html>
"""
