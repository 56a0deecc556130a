"""The one-glance summary of the benchmark suite: time to accuracy and speed per row against native.

``python benchmarks/suite.py --summary`` runs every row of :data:`SUMMARY_ROWS` ``--tta-repeats``
times (default 3) on one emulated WAN (default 20 Mbit/s per party link + 50 ms one way) in
accuracy mode and writes ``bench_out/summary.json``, the Markdown table (stdout and
``bench_out/summary.md``) and the plot ``docs/images/summary.png``. This module holds the pure parts
(unit-tested in tests/test_wan.py) and re-renders a saved run::

    python benchmarks/summary.py bench_out/summary.json [--plot docs/images/summary.png] [--md FILE]

Every figure of a row is the median over its runs; "spread" is max/min - 1 of the runs' times to the
target. A row's time per iteration is its slowest worker's mean (the run's training time over its
iterations), so rows that communicate only every few iterations (HFA, ESync) are not flattered by a
median of local steps.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import List, Optional, Sequence

#: The rows of the summary, in table order: native, then geomx's rows one switch each, then the
#: combinations. Each is a ``benchmarks/suite.py`` row name.
SUMMARY_ROWS = ("native", "geomx-fsa", "geomx-p3", "geomx-fp16", "geomx-bsc", "geomx-mpq", "geomx-mixedsync",
                "geomx-dcasgd", "geomx-hfa-5x4", "geomx-esync", "geomx-dgt-udp", "geomx-tsengine", "geomx-2gs",
                "geomx-bsc-2gs")
SUMMARY_WAN = "20mbit,delay=50ms"

def _median(values: Sequence[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def merge_accuracy_runs(runs: Sequence[dict]) -> dict:
    """One summary row from a row's repeated accuracy runs (``suite._run_row`` in accuracy mode).

    Medians over the runs that finished; the time to target over the runs that reached it (with
    ``reached`` = how many did, out of ``runs``). The evaluation curve kept for the plot is that of
    the run whose time to target (or, when none reached it, final accuracy) is the median.
    """
    good = [r for r in runs if r.get("ok")]
    out = {"row": runs[0]["row"] if runs else None, "runs": len(runs), "ok_runs": len(good), "ok": bool(good)}
    if not good:
        out["status"] = [r.get("status") for r in runs]
        return out
    times = [r["time_to_target_s"] for r in good if r.get("time_to_target_s") is not None]
    out["reached"] = len(times)
    out["time_to_target_s"] = _median(times)
    out["time_to_target_runs"] = times
    out["tta_spread"] = (max(times) / min(times) - 1.0) if len(times) > 1 else None
    out["s_per_iter"] = _median([r.get("tta_mean_s") for r in good])
    out["s_per_iter_runs"] = [r.get("tta_mean_s") for r in good]
    out["final_acc"] = _median([r.get("final_acc") for r in good])
    out["final_acc_runs"] = [r.get("final_acc") for r in good]
    out["wan_bytes_per_iter"] = _median([r.get("wan_bytes_per_iter") for r in good])
    key = (lambda r: r["time_to_target_s"]) if len(times) == len(good) else (lambda r: r.get("final_acc") or 0.0)
    mid = sorted(good, key=key)[len(good) // 2]
    out["evals"] = mid.get("evals", [])
    return out


def add_ratios(rows: List[dict]) -> None:
    """Speed and time to target against the ``native`` row (native / row: > 1 is faster)."""
    nat = next((r for r in rows if r.get("row") == "native" and r.get("ok")), None)
    for r in rows:
        if nat is None or not r.get("ok"):
            continue
        if nat.get("s_per_iter") and r.get("s_per_iter"):
            r["speed_ratio"] = nat["s_per_iter"] / r["s_per_iter"]
        if nat.get("time_to_target_s") and r.get("time_to_target_s"):
            r["tta_ratio"] = nat["time_to_target_s"] / r["time_to_target_s"]


def fmt(v: Optional[float], spec: str, empty: str = "-") -> str:
    """``v`` formatted with ``spec``; ``empty`` for a missing value (benchmarks/suite.py's tables too)."""
    return empty if v is None else format(v, spec)


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None (with a note) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# matplotlib not installed (pip install geomx[bench]); no plot", file=sys.stderr)
        return None
    return plt


def _x(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.1f}x" if v >= 10 else f"{v:.2f}x"


def markdown(report: dict) -> str:
    """The summary table: one line per row, ratios against native."""
    target = report.get("config", {}).get("target_acc", 0.9)
    flags = {r["name"]: r.get("flags", "") for r in report.get("config", {}).get("rows", [])}
    lines = [f"| row | s/iter | speed vs native | time to {target:.0%} (s) | spread | reached "
             f"| vs native | final acc | WAN MB/iter | switch |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        name = r.get("row")
        if not r.get("ok"):
            lines.append(f"| {name} | FAILED ({r.get('status')}) | | | | | | | | {flags.get(name, '')} |")
            continue
        t = r.get("time_to_target_s")
        spread = r.get("tta_spread")
        wan = r.get("wan_bytes_per_iter")
        lines.append(
            f"| {name} | {r['s_per_iter']:.3f} | {_x(r.get('speed_ratio'))} "
            f"| {fmt(t, '.1f', 'never')} | {'-' if spread is None else f'{spread * 100:.0f}%'} "
            f"| {r.get('reached', 0)}/{r.get('ok_runs')} | {_x(r.get('tta_ratio'))} "
            f"| {fmt(r.get('final_acc'), '.3f')} "
            f"| {fmt(None if wan is None else wan / 1e6, '.2f')} | {flags.get(name, '')} |")
    return "\n".join(lines)


def plot(report: dict, path: str) -> bool:
    """Accuracy against training time per row (the median run; log time axis) and WAN MB per
    iteration (log axis). False when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return False
    from matplotlib import ticker
    rows = [r for r in report["rows"] if r.get("ok")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    cmap = plt.get_cmap("tab20")
    for i, r in enumerate(rows):
        ev = [e for e in r.get("evals", []) if e["t"] > 0]
        if ev:
            style = {"color": "black", "linewidth": 2.2} if r["row"] == "native" else {"color": cmap(i % 20)}
            ax1.plot([e["t"] for e in ev], [e["acc"] for e in ev], label=r["row"], **style)
    target = report.get("config", {}).get("target_acc")
    if target:
        ax1.axhline(target, color="grey", linestyle=":", linewidth=1)
    ax1.set_xscale("log")
    ax1.set_xlabel("training time, s (log scale)")
    ax1.set_ylabel("test accuracy (load_digits, worker 0)")
    ax1.set_title(f"accuracy against time: {report.get('config', {}).get('wan', '')}")
    ax1.legend(fontsize=7, ncol=2, loc="lower right")
    names = [r["row"] for r in rows if r.get("wan_bytes_per_iter")]
    mb = [r["wan_bytes_per_iter"] / 1e6 for r in rows if r.get("wan_bytes_per_iter")]
    ax2.barh(range(len(names)), mb, color=["#555555" if n == "native" else "#2a7ab9" for n in names])
    ax2.set_yticks(range(len(names)))
    ax2.set_yticklabels(names, fontsize=8)
    ax2.invert_yaxis()
    ax2.set_xscale("log")
    ax2.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax2.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    for i, v in enumerate(mb):
        ax2.text(v, i, f" {v:.2f}", va="center", fontsize=7)
    ax2.set_xlim(min(mb) / 1.5, max(mb) * 3)
    ax2.set_xlabel("WAN MB per iteration (all links, log scale)")
    ax2.set_title("bytes on the WAN")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", help="bench_out/summary.json written by benchmarks/suite.py --summary")
    p.add_argument("--plot", default=None, help="write the plot here (e.g. docs/images/summary.png)")
    p.add_argument("--md", default=None, help="write the table here")
    args = p.parse_args(argv)
    with open(args.report) as f:
        report = json.load(f)
    table = markdown(report)
    print(table)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table + "\n")
    if args.plot:
        plot(report, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
