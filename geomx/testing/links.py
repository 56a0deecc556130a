"""The emulated WAN's link specification and its byte accounting: pure functions, no root needed.

``--wan SPEC`` (the grammar is in :mod:`geomx.testing.wan`) parses to a :class:`WanSpec`; the
router's interface counters parse to :class:`LinkCounters` per data center, from which come the
lower bound of a run's time, each link's busy share and the report table. Unit-tested without
network namespaces (tests/test_wan.py).
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple


class WanError(RuntimeError):
    """The emulated WAN cannot be built or used (not root, missing tools, bad specification)."""


# --------------------------------------------------------------------------------------------------
# Specification
# --------------------------------------------------------------------------------------------------

_RATE_UNITS = {
    "bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
    "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9,
}
_RATE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_rate(text: str) -> Optional[float]:
    """``"20mbit"`` -> 20e6 (bits per second); ``"none"``/``"inf"``/``"0"`` -> None (uncapped)."""
    t = str(text).strip().lower()
    if t in ("none", "inf", "unlimited", "uncapped", "0"):
        return None
    m = _RATE_RE.match(t)
    if not m:
        raise WanError(f"invalid rate {text!r}: expected a number with a unit such as 20mbit, 1gbit, 500kbit")
    value, unit = float(m.group(1)), m.group(2) or "bit"
    if unit not in _RATE_UNITS:
        raise WanError(f"invalid rate unit {m.group(2)!r} in {text!r}: use one of {', '.join(_RATE_UNITS)}")
    bits = value * _RATE_UNITS[unit]
    if bits <= 0:
        return None
    if bits < 8000:
        raise WanError(f"rate {text!r} is below 8 kbit/s; tbf cannot emulate it usefully")
    return bits


def format_rate(bits: Optional[float]) -> str:
    """Inverse of :func:`parse_rate` for display: 20e6 -> ``"20mbit"``, None -> ``"uncapped"``."""
    if bits is None:
        return "uncapped"
    for unit, mult in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if bits >= mult:
            v = bits / mult
            return f"{v:g}{unit}" if abs(v - round(v, 3)) < 1e-9 else f"{v:.3f}{unit}"
    return f"{bits:g}bit"


@dataclasses.dataclass
class WanSpec:
    """Per-DC link rates (bits/s; None = uncapped) and the one-way delay (ms; only 0 is supported)."""

    rates: Dict[str, Optional[float]]
    delay_ms: float = 0.0

    def rate(self, dc: str) -> Optional[float]:
        return self.rates.get(dc)

    def describe(self) -> str:
        parts = [f"{dc}={format_rate(r)}" for dc, r in self.rates.items()]
        if self.delay_ms:
            parts.append(f"delay={self.delay_ms:g}ms")
        return ",".join(parts)


def dc_names(parties: int, global_server_dcs: int = 0) -> List[str]:
    """Data centers of a topology: ``central``, ``party0`` .. ``party{P-1}`` and, when global servers
    have data centers of their own, ``gs0`` .. ``gs{N-1}``."""
    return ["central"] + [f"party{p}" for p in range(parties)] + [f"gs{i}" for i in range(global_server_dcs)]


def parse_spec(text: str, parties: int, global_server_dcs: int = 0) -> WanSpec:
    """Parse a ``--wan`` specification for ``parties`` parties (and ``global_server_dcs`` data
    centers of global servers; see the module docstring)."""
    if parties < 1:
        raise WanError(f"parties must be >= 1, got {parties}")
    if text is None or not str(text).strip():
        raise WanError("empty WAN specification: give a rate such as 20mbit or party0=100mbit,party1=10mbit")
    rates: Dict[str, Optional[float]] = {dc: None for dc in dc_names(parties, global_server_dcs)}
    default_seen = False
    explicit: Dict[str, Optional[float]] = {}
    delay = 0.0
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            if default_seen:
                raise WanError(f"two default rates in {text!r}")
            default_seen = True
            r = parse_rate(item)
            for p in range(parties):
                rates[f"party{p}"] = r
            continue
        key = key.strip().lower()
        if key in ("delay", "latency"):
            m = re.match(r"^\s*([0-9]*\.?[0-9]+)\s*(ms)?\s*$", value.lower())
            if not m:
                raise WanError(f"invalid delay {value!r}: expected milliseconds such as 25 or 25ms")
            delay = float(m.group(1))
            continue
        r = parse_rate(value)
        if key == "all":
            for dc in rates:
                rates[dc] = r
        elif key in rates:
            explicit[key] = r
        elif re.fullmatch(r"party\d+", key):
            raise WanError(f"{key} in {text!r}: the topology has only {parties} parties (party0..party{parties - 1})")
        elif re.fullmatch(r"gs\d+", key):
            raise WanError(f"{key} in {text!r}: global servers have {global_server_dcs} data centers of their own "
                           "(see --separate-global-servers)")
        else:
            raise WanError(f"unknown link {key!r} in {text!r}: use central, partyN, gsN, all or delay")
    rates.update(explicit)
    for i in range(global_server_dcs):  # a global server's own link is a central one
        if f"gs{i}" not in explicit:
            rates[f"gs{i}"] = rates["central"]
    return WanSpec(rates=rates, delay_ms=delay)


# --------------------------------------------------------------------------------------------------
# Counters, bounds, report (pure functions: unit-tested without root)
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class LinkCounters:
    """Bytes one DC sent into the WAN (``up``) and received from it (``down``) on its access link."""

    up: int = 0
    down: int = 0
    up_packets: int = 0
    down_packets: int = 0

    @property
    def total(self) -> int:
        return self.up + self.down


def parse_link_counters(ip_json: str, iface_to_dc: Mapping[str, str]) -> Dict[str, LinkCounters]:
    """Parse ``ip -j -s link show`` run in the router namespace.

    ``iface_to_dc`` maps the router-side interface (``dc0``) to its DC. On the router side ``rx`` is
    what the DC uploaded and ``tx`` what it downloaded. Interfaces not in the map are ignored.
    """
    try:
        entries = json.loads(ip_json)
    except json.JSONDecodeError as exc:
        raise WanError(f"cannot parse `ip -j -s link` output: {exc}") from None
    out: Dict[str, LinkCounters] = {}
    for e in entries:
        name = e.get("ifname")
        if name not in iface_to_dc:
            continue
        stats = e.get("stats64") or e.get("stats") or {}
        rx, tx = stats.get("rx", {}), stats.get("tx", {})
        out[iface_to_dc[name]] = LinkCounters(
            up=int(rx.get("bytes", 0)), down=int(tx.get("bytes", 0)),
            up_packets=int(rx.get("packets", 0)), down_packets=int(tx.get("packets", 0)))
    missing = sorted(set(iface_to_dc) - {n for n in (e.get("ifname") for e in entries)})
    if missing:
        raise WanError(f"`ip -j -s link` has no interface {', '.join(missing)}")
    return out


def counter_delta(after: Mapping[str, LinkCounters], before: Mapping[str, LinkCounters]) -> Dict[str, LinkCounters]:
    """Per-DC difference of two counter snapshots."""
    out = {}
    for dc, a in after.items():
        b = before.get(dc, LinkCounters())
        out[dc] = LinkCounters(a.up - b.up, a.down - b.down, a.up_packets - b.up_packets,
                               a.down_packets - b.down_packets)
    return out


def link_times(counters: Mapping[str, LinkCounters], rates: Mapping[str, Optional[float]],
               duplex: bool = False) -> Dict[str, float]:
    """Seconds each capped link needs to carry its bytes at its rate.

    ``duplex=False`` (the default, used for the benchmark bound): up + down bytes, i.e. a round's
    uploads and downloads do not overlap (in synchronous training the updated value of a tensor comes
    back only after every push of it has arrived). ``duplex=True``: max(up, down), the physical bound
    of a full-duplex link. Uncapped links are left out.
    """
    out = {}
    for dc, c in counters.items():
        rate = rates.get(dc)
        if rate is None:
            continue
        nbytes = max(c.up, c.down) if duplex else c.up + c.down
        out[dc] = nbytes * 8.0 / rate
    return out


def lower_bound(compute_s: float, counters: Mapping[str, LinkCounters],
                rates: Mapping[str, Optional[float]], duplex: bool = False) -> dict:
    """max(compute time, bytes on the bottleneck link / its rate), with the bottleneck named.

    Returns ``{"bound_s", "compute_s", "wan_s", "bottleneck"}`` (``bottleneck`` is a DC name, or
    ``"compute"`` when computation dominates, or None when no link is capped and compute is 0).
    """
    times = link_times(counters, rates, duplex=duplex)
    bottleneck, wan_s = None, 0.0
    for dc, t in times.items():
        if t > wan_s:
            bottleneck, wan_s = dc, t
    bound = max(compute_s, wan_s)
    if compute_s >= wan_s and compute_s > 0:
        bottleneck = "compute"
    return {"bound_s": bound, "compute_s": compute_s, "wan_s": wan_s, "bottleneck": bottleneck}


def parse_proc_net_dev(text: str, ifaces: Iterable[str]) -> Dict[str, tuple]:
    """``(rx_bytes, tx_bytes)`` of each of ``ifaces`` from ``/proc/net/dev``'s text."""
    wanted, out = set(ifaces), {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        name = name.strip()
        if sep and name in wanted:
            fields = rest.split()
            out[name] = (int(fields[0]), int(fields[8]))
    return out


def busy_fractions(samples: Sequence[tuple], rates: Mapping[str, Optional[float]], start: float, end: float,
                   threshold: float = 0.1) -> Dict[str, Dict[str, float]]:
    """Per capped link and direction, the fraction of ``[start, end]`` it was busy.

    ``samples``: ``(time, {dc: (up bytes, down bytes)})`` in time order, as :meth:`Wan.stop_sampling`
    returns them. An interval between two samples counts as busy in a direction when that direction
    carried at least ``threshold`` of what the link's rate allows in it: TCP acknowledgements of
    the other direction's data (about 1/30 of its bytes) do not make a direction busy. (The
    shaper lets a burst of up to 64 KiB out at once after an idle spell, so a busy interval may
    carry more than the rate: the share of the capacity used is bytes / (rate x time).)
    """
    busy: Dict[str, Dict[str, float]] = {}
    total = 0.0
    for dt, a, b in _intervals(samples, start, end):
        total += dt
        for dc, rate in rates.items():
            if rate is None or dc not in a or dc not in b:
                continue
            cap = rate / 8.0 * dt
            row = busy.setdefault(dc, {"up": 0.0, "down": 0.0})
            for i, way in enumerate(("up", "down")):
                if b[dc][i] - a[dc][i] >= threshold * cap:
                    row[way] += dt
    if total <= 0:
        return {}
    return {dc: {way: t / total for way, t in row.items()} for dc, row in busy.items()}


def _intervals(samples: Sequence[tuple], start: float, end: float) -> Iterable[tuple]:
    """``(seconds, counters before, counters after)`` of each interval between two consecutive
    samples taken in ``[start, end]``."""
    inside = [s for s in samples if start <= s[0] <= end]
    return ((t1 - t0, a, b) for (t0, a), (t1, b) in zip(inside, inside[1:]))


def timeline(samples: Sequence[tuple], rate: float, dc: str, start: float, end: float) -> Tuple[str, str]:
    """``dc``'s link from ``start`` to ``end`` as two lines of characters, up and down, one per
    sample interval: ``#`` at least half the rate, ``+`` at least a tenth, ``.`` less (idle, or
    acknowledgements only)."""
    lines = ["", ""]
    for dt, a, b in _intervals([s for s in samples if dc in s[1]], start, end):
        cap = rate / 8.0 * dt
        for i in (0, 1):
            moved = b[dc][i] - a[dc][i]
            lines[i] += "#" if moved >= 0.5 * cap else "+" if moved >= 0.1 * cap else "."
    return lines[0], lines[1]


def _fmt_bytes(n: float) -> str:
    for unit, mult in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= mult:
            return f"{n / mult:.2f} {unit}"
    return f"{n:.0f} B"


def format_report(counters: Mapping[str, LinkCounters], rates: Mapping[str, Optional[float]],
                  seconds: Optional[float] = None) -> str:
    """Markdown table: per link, its rate, bytes up/down and (given the elapsed time) mean utilisation."""
    lines = ["| link | rate | up (DC -> WAN) | down (WAN -> DC) | total |"
             + (" mean up / down rate |" if seconds else ""),
             "|---|---|---|---|---|" + ("---|" if seconds else "")]
    tot = LinkCounters()
    for dc, c in counters.items():
        row = (f"| {dc} | {format_rate(rates.get(dc))} | {_fmt_bytes(c.up)} | {_fmt_bytes(c.down)} "
               f"| {_fmt_bytes(c.total)} |")
        if seconds:
            row += f" {format_rate(c.up * 8 / seconds)} / {format_rate(c.down * 8 / seconds)} |"
        lines.append(row)
        tot.up += c.up
        tot.down += c.down
    lines.append(f"| all | | {_fmt_bytes(tot.up)} | {_fmt_bytes(tot.down)} | {_fmt_bytes(tot.total)} |"
                 + (" |" if seconds else ""))
    return "\n".join(lines)
