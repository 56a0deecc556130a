"""What a geomx process measures, and the one place that names it.

Every metric is declared once in :data:`CATALOGUE` (name, kind, unit, labels, meaning); docs/Observability.md
is that table. A process keeps one :class:`Metrics`. Most figures already exist as plain counters on
the objects that do the work (a :class:`~geomx.transport.Link` counts its bytes, a key's state counts
its rounds), so they are read only when somebody asks, by *collectors* that run in the node's
event-loop thread: counting costs the data path nothing. Rare events (a refused message, a checkpoint
save, a round that waited for a party) are counted where they happen with :meth:`Metrics.inc`.

:class:`MetricsServer` answers ``GET /metrics`` in Prometheus' text format (version 0.0.4) and
``GET /metrics.json`` with the same samples as JSON (what tests, benchmarks and the launcher's status
page read). It serves from a thread of its own and asks the event loop for a fresh reading; a loop
that does not answer within a second (a global server busy in its optimizer) gets the last reading,
marked by ``geomx_metrics_stale 1``.
"""
from __future__ import annotations

import collections
import http.server
import json
import logging
import math
import os
import resource
import socket
import statistics
import threading
import time
from typing import Callable, Deque, Dict, Iterable, List, NamedTuple, Optional, Tuple

from .security import RateLimitedLog

log = logging.getLogger("geomx.metrics")

Labels = Tuple[Tuple[str, str], ...]


class Family(NamedTuple):
    kind: str  # "counter" or "gauge"
    unit: str
    labels: Tuple[str, ...]
    help: str


#: Every metric a geomx process can expose. Counters end in ``_total``; units are in the name.
CATALOGUE: Dict[str, Family] = {
    "geomx_node_info": Family("gauge", "", ("role", "node", "party"),
                              "Always 1: the node's role, name and party, for joins in PromQL."),
    "geomx_link_sent_bytes_total": Family(
        "counter", "bytes", ("link", "scope"),
        "Bytes of geomx messages this process sent on a link (frames as handed to ZeroMQ; scope: wan for "
        "the links between a party and the global servers, lan inside a site)."),
    "geomx_link_received_bytes_total": Family(
        "counter", "bytes", ("link", "scope"),
        "Bytes of geomx messages this process received on a link (on a listener with ZeroMQ's identity frames)."),
    "geomx_link_sent_messages_total": Family("counter", "", ("link", "scope"),
                                             "geomx messages this process sent on a link."),
    "geomx_link_received_messages_total": Family("counter", "", ("link", "scope"),
                                                 "geomx messages this process received on a link."),
    "geomx_link_tcp_sent_bytes_total": Family(
        "counter", "bytes", ("link", "scope"),
        "What a link's TCP connections sent, as the kernel counts it (acknowledged payload: geomx messages plus "
        "ZeroMQ's framing, handshakes, heartbeats and CURVE's boxes; no IP or TCP headers). Linux, TCP links only."),
    "geomx_link_tcp_received_bytes_total": Family(
        "counter", "bytes", ("link", "scope"),
        "What a link's TCP connections received, as the kernel counts it (payload, as for the sent bytes)."),
    "geomx_peer_received_bytes_total": Family(
        "counter", "bytes", ("link", "peer"),
        "A listener's received bytes by the peer that sent them, as the peer counts them sent (a global "
        "server's WAN listener: per party)."),
    "geomx_refused_messages_total": Family(
        "counter", "", ("link", "peer", "reason"),
        "Messages refused (malformed, unauthorised, out of protocol) by link, sender and kind of refusal."),
    "geomx_rounds_total": Family(
        "counter", "", (), "Aggregation rounds this server completed, summed over its keys (P3 slices: per slice)."),
    "geomx_round_seconds_total": Family(
        "counter", "seconds", (),
        "Time from a round's first push to its completion, summed over rounds (divide by geomx_rounds_total)."),
    "geomx_round_waited_for_total": Family(
        "counter", "", ("peer",),
        "Rounds whose last push came from this peer: the party (or worker) the round waited for."),
    "geomx_round_wait_seconds_total": Family(
        "counter", "seconds", ("peer",),
        "For the rounds a peer completed last: time from the round's first push to that peer's, summed."),
    "geomx_codec_input_bytes_total": Family(
        "counter", "bytes", ("codec",), "Bytes of the dense tensors a local server's codec encoded for the WAN."),
    "geomx_codec_output_bytes_total": Family(
        "counter", "bytes", ("codec",),
        "Bytes of the encoded payloads it sent instead (input over output: the compression ratio)."),
    "geomx_codec_residual_norm": Family(
        "gauge", "", ("codec",), "L2 norm of what the codec's error feedback holds back, over every key."),
    "geomx_wan_round_trips_total": Family(
        "counter", "", (), "A local server's requests to the global servers answered (a key's round each)."),
    "geomx_wan_round_trip_seconds_total": Family(
        "counter", "seconds", (), "Their time from the push to the global servers' answer, summed."),
    "geomx_wan_round_trip_p50_seconds": Family(
        "gauge", "seconds", (), "The median of that time over the last 10,000 round trips."),
    "geomx_wan_round_trip_p90_seconds": Family(
        "gauge", "seconds", (), "Its 90th percentile over the last 10,000 round trips."),
    "geomx_mixedsync_updates_total": Family(
        "counter", "", ("peer",), "MixedSync (dist_async): a party's pushes the global server applied, by party."),
    "geomx_mixedsync_staleness_total": Family(
        "counter", "", ("peer",),
        "MixedSync: for each of them, the other parties' updates of the key since this party received its "
        "weights, summed (divided by the updates: the mean staleness)."),
    "geomx_esync_local_steps": Family(
        "gauge", "", ("peer",), "ESync: the local steps the global server assigns a party for its next round."),
    "geomx_hfa_party_rounds_total": Family(
        "counter", "", (),
        "HFA and ESync, at a local server: its party's averaging rounds (each after the workers' local steps)."),
    "geomx_hfa_global_rounds_total": Family(
        "counter", "", (), "HFA and ESync: those of its rounds that were averaged across the parties too."),
    "geomx_dgt_blocks_sent_total": Family(
        "counter", "", ("kind",),
        "DGT, at a local server: gradient blocks sent reliably (reliable), on the unreliable channel (low), left "
        "out as all zero (dropped_zero), dropped on purpose before sending (udp_lost_at_sender, a test setting)."),
    "geomx_dgt_k": Family("gauge", "", (), "DGT, at a local server: K, the share of blocks it sends reliably."),
    "geomx_dgt_blocks_received_total": Family(
        "counter", "", ("outcome",),
        "DGT, at a global server: blocks taken (blocks), after their round (late), again (duplicates), too old "
        "(too_old), refused (rejected; forged: their MAC failed; out_of_window), never arrived (missing); pushes "
        "reassembled (pushes)."),
    "geomx_keys": Family("gauge", "", (), "Keys (or key parts) this server holds."),
    "geomx_pending_requests": Family("gauge", "", (), "Requests a client sent and has no answer to yet."),
    "geomx_parked_requests": Family(
        "gauge", "", (), "Requests a server holds for a round not complete yet (pulls, and pushes of rounds ahead)."),
    "geomx_early_requests": Family(
        "gauge", "", (), "Requests a server holds from clients it does not know yet (before their registration)."),
    "geomx_open_rounds": Family("gauge", "", (), "Rounds a server has begun and not completed, over every key."),
    "geomx_checkpoint_saves_total": Family("counter", "", (), "Checkpoints this global server wrote."),
    "geomx_deadline_misses_total": Family(
        "counter", "", ("peer",),
        "Requests a server did not answer within GEOMX_REQUEST_TIMEOUT, by that server (each fails its run)."),
    "geomx_training_loss": Family("gauge", "", (), "The last loss the training script reported (report_loss)."),
    "geomx_training_accuracy": Family("gauge", "", (),
                                      "The last accuracy the training script reported (report_accuracy)."),
    "geomx_training_steps": Family("gauge", "", (), "The training step the script last reported (report_progress)."),
    "geomx_training_steps_planned": Family(
        "gauge", "", (), "The steps the script plans in all, when it said (report_progress); the progress line's ETA."),
    "geomx_process_cpu_seconds_total": Family("counter", "seconds", (), "CPU time of this process, user and system."),
    "geomx_process_resident_memory_bytes": Family("gauge", "bytes", (), "Resident memory of this process."),
    "geomx_process_peak_resident_memory_bytes": Family("gauge", "bytes", (),
                                                       "The most resident memory this process has had."),
    "geomx_metrics_stale": Family("gauge", "", (),
                                  "1 when the event loop did not answer in time and this reading is the last one."),
}


#: Most label sets one event counter keeps (see Metrics.inc).
MAX_SERIES = 200


class Sample(NamedTuple):
    name: str
    labels: Labels
    value: float


Collector = Callable[[], Iterable[Sample]]


def sample(name: str, value: float, **labels: object) -> Sample:
    """One reading of a catalogued metric (unknown names fail here, in tests, not at a scrape)."""
    family = CATALOGUE[name]
    if set(labels) != set(family.labels):
        raise ValueError(f"{name} takes the labels {family.labels}, got {tuple(labels)}")
    return Sample(name, tuple((k, str(labels[k])) for k in family.labels), float(value))


class Metrics:
    """The metrics of one node: event counters plus collectors read on demand."""

    def __init__(self, role: str, node: str, party: str = "") -> None:
        self.info = {"role": role, "node": node, "party": party}
        self._counts: Dict[Tuple[str, Labels], float] = {}
        self._series: Dict[str, int] = {}  # name -> label sets counted by inc
        self._collectors: List[Collector] = []

    def inc(self, name: str, amount: float = 1.0, **labels: object) -> None:
        s = sample(name, amount, **labels)
        key = (s.name, s.labels)
        if key not in self._counts:
            # Labels can come from the network (a refused sender's identity): past MAX_SERIES series
            # of one name, new ones are counted under peer="other", so no peer can grow the node.
            if self._series.get(name, 0) >= MAX_SERIES:
                key = (s.name, tuple((k, "other" if k == "peer" else v) for k, v in s.labels))
            if key not in self._counts:
                self._series[name] = self._series.get(name, 0) + 1
        self._counts[key] = self._counts.get(key, 0.0) + s.value

    def set(self, name: str, value: float, **labels: object) -> None:
        s = sample(name, value, **labels)
        self._counts[(s.name, s.labels)] = s.value

    def add_collector(self, fn: Collector) -> None:
        self._collectors.append(fn)

    def identify(self, role: Optional[str] = None, node: Optional[str] = None, party: Optional[str] = None) -> None:
        """Name the node (its name changes once its tier gives it a rank: ``local_server1``)."""
        for field, given in (("role", role), ("node", node), ("party", party)):
            if given is not None:
                self.info[field] = given

    def collect(self) -> List[Sample]:
        """Every sample now. Runs in the event-loop thread (collectors read its objects unlocked)."""
        out = [sample("geomx_node_info", 1, **self.info)]
        out += [Sample(name, labels, value) for (name, labels), value in list(self._counts.items())]
        for fn in self._collectors:
            try:
                out.extend(fn())
            except Exception:  # noqa: BLE001 - one broken collector must not hide the others
                log.exception("a metrics collector failed")
        out.extend(process_samples())
        return out


def process_samples() -> List[Sample]:
    t = os.times()
    out = [sample("geomx_process_cpu_seconds_total", t.user + t.system)]
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        out.append(sample("geomx_process_resident_memory_bytes", resident_pages * os.sysconf("SC_PAGE_SIZE")))
        # ru_maxrss is in kilobytes on Linux (bytes on macOS, where there is no /proc to get this far).
        out.append(sample("geomx_process_peak_resident_memory_bytes",
                          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
    except (OSError, ValueError, IndexError):
        pass  # not Linux: no memory figure
    return out


def link_samples(links: Iterable) -> List[Sample]:
    """Bytes per link of an event loop (``loop.links``), both directions, and a listener's by peer
    (the identities of one peer's successive connections together)."""
    out: List[Sample] = []
    for link in list(links):
        scope = "wan" if link.wan else "lan"
        out.append(sample("geomx_link_sent_bytes_total", link.bytes_sent, link=link.name, scope=scope))
        out.append(sample("geomx_link_received_bytes_total", link.bytes_received, link=link.name, scope=scope))
        out.append(sample("geomx_link_sent_messages_total", link.messages_sent, link=link.name, scope=scope))
        out.append(sample("geomx_link_received_messages_total", link.messages_received, link=link.name, scope=scope))
        kernel = link.kernel.totals()  # what the kernel counted (transport/kernel_bytes.py)
        if kernel is not None:
            out.append(sample("geomx_link_tcp_sent_bytes_total", kernel[0], link=link.name, scope=scope))
            out.append(sample("geomx_link_tcp_received_bytes_total", kernel[1], link=link.name, scope=scope))
        by_name: Dict[str, int] = {}
        for identity, size in list(link.bytes_by_peer.items()):
            name = peer_name(identity)
            by_name[name] = by_name.get(name, 0) + size
        for name, size in sorted(by_name.items()):
            out.append(sample("geomx_peer_received_bytes_total", size, link=link.name, peer=name))
    return out


# -- exposition -------------------------------------------------------------------------------------

def _escape(value: str, quotes: bool = True) -> str:
    """A label value (``quotes``) or HELP text in the exposition format's escapes."""
    value = value.replace("\\", "\\\\").replace("\n", "\\n")
    return value.replace('"', '\\"') if quotes else value


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(int(value)) if value == int(value) and abs(value) < 2 ** 53 else repr(value)


def render_text(samples: Iterable[Sample]) -> str:
    """Prometheus' text exposition format: a HELP and TYPE line per family, then its samples."""
    by_name: Dict[str, List[Sample]] = {}
    for s in samples:
        by_name.setdefault(s.name, []).append(s)
    lines: List[str] = []
    for name in sorted(by_name):
        family = CATALOGUE[name]
        lines.append(f"# HELP {name} {_escape(family.help, quotes=False)}")
        lines.append(f"# TYPE {name} {family.kind}")
        for s in by_name[name]:
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in s.labels)
            lines.append(f"{name}{{{labels}}} {_number(s.value)}" if labels else f"{name} {_number(s.value)}")
    return "\n".join(lines) + "\n"


def to_json(samples: Iterable[Sample], info: Dict[str, str]) -> dict:
    """The same samples for programs: ``{"node": {...}, "time": t, "samples": [[name, {labels}, value]]}``."""
    return {"node": dict(info), "time": time.time(),
            "samples": [[s.name, dict(s.labels), s.value] for s in samples]}


def dump(m: Metrics, directory: str) -> Optional[str]:
    """Write ``m``'s reading now as ``<directory>/<node>-<pid>.json`` (GEOMX_METRICS_DIR, at a process's
    end: its last figures, for tests and benchmarks); returns the path, None if it could not."""
    name = f"{m.info['party']}-{m.info['node']}" if m.info["party"] else m.info["node"]
    path = os.path.join(directory, f"{name.replace('/', '-')}-{os.getpid()}.json")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(to_json(m.collect(), m.info), f)
        os.replace(path + ".tmp", path)
    except OSError as exc:
        log.error("could not write the metrics to %s: %s", path, exc)
        return None
    return path


def load_dumps(directory: str) -> Dict[str, dict]:
    """Every reading :func:`dump` wrote into ``directory``, by ``party/node`` (``party0/worker0``,
    ``central/global_server0``; the node alone where it has no party)."""
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".json"):
            with open(os.path.join(directory, name)) as f:
                reading = json.load(f)
            node = reading["node"]
            out[f"{node['party']}/{node['node']}" if node["party"] else node["node"]] = reading
    return out


def of_role(readings: Dict[str, dict], role: str) -> List[dict]:
    """The readings (:func:`load_dumps`) of every node of ``role`` (``local_server``, ``global_server``, ...),
    in the order of their names."""
    return [r for _, r in sorted(readings.items()) if r["node"]["role"] == role]


def has(reading: dict, name: str) -> bool:
    """Whether a JSON reading has any sample of ``name``."""
    return any(n == name for n, _, _ in reading["samples"])


def by_label(reading: dict, name: str, label: str) -> Dict[str, float]:
    """``name``'s samples in a JSON reading, by the value of their label ``label``."""
    out: Dict[str, float] = {}
    for n, ls, v in reading["samples"]:
        if n == name and label in ls:
            out[ls[label]] = out.get(ls[label], 0.0) + v
    return out


def value(reading: dict, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples in a JSON reading whose labels include ``labels`` (0 if none)."""
    return sum(v for n, ls, v in reading["samples"]
               if n == name and all(ls.get(k) == want for k, want in labels.items()))


MAX_HTTP_CONNECTIONS = 16
"""Connections one read-only HTTP listener (a node's metrics, the status page) serves at once, each in a
thread of its own; one more is closed at once (a scraper retries at its next interval)."""

HTTP_IDLE_TIMEOUT = 10.0
"""Seconds a listener's connection may stay silent (no request line, no header) before it is closed."""

HTTP_CONNECTION_DEADLINE = 30.0
"""Seconds a listener's connection may last in all (an answer takes milliseconds): one that sends its
request a byte at a time cannot keep its slot longer."""

_refused_http = RateLimitedLog()  # connections refused for being one too many


class _BoundedHTTPServer(http.server.ThreadingHTTPServer):
    """A thread per connection, at most ``limit`` at once: held-open connections cannot pile up threads."""

    daemon_threads = True

    def __init__(self, address: Tuple[str, int], handler: type, limit: int, name: str,
                 deadline: float = HTTP_CONNECTION_DEADLINE) -> None:
        self._deadline = deadline
        self._limit = limit
        self._name = name
        self._lock = threading.Lock()
        self.active = 0  # connections being served now
        super().__init__(address, handler)

    def _take_slot(self) -> bool:
        with self._lock:
            if self.active >= self._limit:
                return False
            self.active += 1
            return True

    def _free_slot(self) -> None:
        with self._lock:
            self.active -= 1

    def process_request(self, request, client_address) -> None:  # noqa: ANN001 - socketserver's signature
        if not self._take_slot():
            _refused_http(logging.WARNING, f"{self._name}: REFUSED a connection from {client_address[0]}: "
                                           f"already serving {self._limit}", key=self._name)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._free_slot()
            raise

    def handle_error(self, request, client_address) -> None:  # noqa: ANN001
        # A connection cut at its deadline, or a client that went away mid-answer: nothing to print.
        log.debug("%s: a connection from %s ended with an error", self._name, client_address[0], exc_info=True)

    def process_request_thread(self, request, client_address) -> None:  # noqa: ANN001
        timer = threading.Timer(self._deadline, _cut, (request,))
        timer.daemon = True
        timer.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            timer.cancel()
            self._free_slot()


def _cut(request: socket.socket) -> None:
    """End a connection past its deadline: its handler's next read or write fails, and its thread ends."""
    try:
        request.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


class HTTPListener:
    """A read-only HTTP listener on ``host:port`` (``*``: every address; port 0: any free one), served
    from daemon threads: ``answer(path)`` gives ``(body, content type)`` for a path it serves, None
    for any other (answered 404 with ``not_found``). ``limit`` connections at once, each closed after
    ``idle_timeout`` silent seconds or ``deadline`` seconds in all."""

    def __init__(self, host: str, port: int, answer: Callable[[str], Optional[Tuple[bytes, str]]],
                 not_found: str, name: str, headers: Tuple[Tuple[str, str], ...] = (),
                 limit: int = MAX_HTTP_CONNECTIONS, idle_timeout: float = HTTP_IDLE_TIMEOUT,
                 deadline: float = HTTP_CONNECTION_DEADLINE) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = idle_timeout

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                found = answer(self.path.split("?", 1)[0])
                if found is None:
                    self.send_error(404, not_found)
                    return
                body, ctype = found
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for header, text in headers:
                    self.send_header(header, text)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: object) -> None:
                log.debug("%s: " + fmt, self.address_string(), *args)

        self.httpd = _BoundedHTTPServer(("" if host == "*" else host, port), Handler, limit, name, deadline)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name=name, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class MetricsServer:
    """``/metrics`` and ``/metrics.json`` of one node, served from a daemon thread.

    ``loop`` (an :class:`~geomx.transport.EventLoop`) runs the collection in its own thread; a loop
    that is gone or busy for over ``wait`` seconds gets the last reading, marked stale.
    """

    def __init__(self, metrics: Metrics, loop, host: str, port: int, wait: float = 1.0) -> None:
        self.metrics = metrics
        self.loop = loop
        self.wait = wait
        self._last: List[Sample] = []
        self._lock = threading.Lock()
        self.listener = HTTPListener(host, port, self._answer, "geomx serves /metrics and /metrics.json",
                                     "geomx-metrics")
        self.port = self.listener.port

    def _answer(self, path: str) -> Optional[Tuple[bytes, str]]:
        if path == "/metrics":
            return render_text(self.read()).encode(), "text/plain; version=0.0.4; charset=utf-8"
        if path == "/metrics.json":
            return json.dumps(to_json(self.read(), self.metrics.info)).encode(), "application/json"
        return None

    def read(self) -> List[Sample]:
        done = threading.Event()
        box: List[List[Sample]] = []

        def collect() -> None:
            box.append(self.metrics.collect())
            done.set()

        try:
            self.loop.call_soon_threadsafe(collect)
        except Exception:  # noqa: BLE001 - a closed loop: serve the last reading
            pass
        with self._lock:
            if done.wait(self.wait) and box:
                self._last = box[0]
                return self._last + [sample("geomx_metrics_stale", 0)]
            return self._last + [sample("geomx_metrics_stale", 1)]

    def close(self) -> None:
        self.listener.close()


def peer_name(client: object) -> str:
    """A client's name for a label: a registered identity's ``NAME`` (``local_server1``), without its
    secret token; a server's client is (link name, identity)."""
    identity = client[1] if isinstance(client, tuple) else client
    if not isinstance(identity, bytes):
        return "?"
    return identity.split(b"#", 1)[0].decode("ascii", "replace")[:64] or "?"


def server_samples(server) -> List[Sample]:
    """A server's keys, completed rounds (P3: each slice's rounds count), their time, who they waited for,
    and what it holds: requests parked for a round, early requests, open rounds."""
    rounds = open_rounds = 0
    for ks in list(server.keys.values()):
        for state in (ks, *list(ks.slices.values())):
            rounds += state.completed
            open_rounds += len(state.rounds)
    parked = sum(count for count, _ in list(server.waiting.values()))
    out = [sample("geomx_keys", len(server.keys)), sample("geomx_rounds_total", rounds),
           sample("geomx_round_seconds_total", server.round_seconds), sample("geomx_parked_requests", parked),
           sample("geomx_early_requests", len(server.early)), sample("geomx_open_rounds", open_rounds)]
    waited: Dict[str, List[float]] = {}
    for client, (count, seconds) in list(server.waited_for.items()):
        total = waited.setdefault(peer_name(client), [0, 0.0])
        total[0] += count
        total[1] += seconds
    for peer, (count, seconds) in sorted(waited.items()):
        out.append(sample("geomx_round_waited_for_total", count, peer=peer))
        out.append(sample("geomx_round_wait_seconds_total", seconds, peer=peer))
    policy = getattr(server, "policy", None)  # the global server's synchronization algorithm
    if policy is not None:
        out += policy.samples()
    return out + server.features.samples()


class Durations:
    """Durations of one kind (a local server's WAN round trips): how many and their sum since the start,
    and the latest ``window`` of them for quantiles, so a run of days keeps a bounded memory."""

    def __init__(self, window: int = 10_000) -> None:
        self.count = 0
        self.total = 0.0
        self.recent: Deque[float] = collections.deque(maxlen=window)

    def add(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        self.recent.append(seconds)

    def quantiles(self) -> Optional[Tuple[float, float]]:
        """(median, 90th percentile) of the recent ones; None below two."""
        if len(self.recent) < 2:
            return None
        recent = list(self.recent)
        return statistics.median(recent), statistics.quantiles(recent, n=10)[-1]


def local_server_samples(server) -> List[Sample]:
    """A local server's WAN round trips, and its WAN codec: bytes in and out, its residual."""
    out = [sample("geomx_wan_round_trips_total", server.round_trips.count),
           sample("geomx_wan_round_trip_seconds_total", server.round_trips.total)]
    q = server.round_trips.quantiles()
    if q is not None:
        out += [sample("geomx_wan_round_trip_p50_seconds", q[0]), sample("geomx_wan_round_trip_p90_seconds", q[1])]
    sender = server.dgt
    if sender is not None:
        out += [sample("geomx_dgt_blocks_sent_total", n, kind=kind) for kind, n in sender.sent.items()]
        out.append(sample("geomx_dgt_k", sender.k.k))
    codec = server.codec
    if codec is None:
        return out
    out += [sample("geomx_codec_input_bytes_total", server.codec_bytes[0], codec=codec.name),
            sample("geomx_codec_output_bytes_total", server.codec_bytes[1], codec=codec.name)]
    norm = codec.residual_norm()
    if norm is not None:
        out.append(sample("geomx_codec_residual_norm", norm, codec=codec.name))
    return out


def serve(port: int, host: str, loop) -> Optional[MetricsServer]:
    """Start ``loop``'s metrics listener on ``host:port`` (GEOMX_METRICS_PORT; 0: none); it closes with
    the loop."""
    if not port:
        return None
    from .errors import ConfigError

    try:
        server = MetricsServer(loop.metrics, loop, host, port)
    except OSError as exc:
        raise ConfigError(f"GEOMX_METRICS_PORT={port}: cannot listen on {host}:{port}: {exc.strerror}") from None
    loop.at_close(server.close)
    log.info("metrics on http://%s:%d/metrics", host, server.port)
    return server
