"""The command lines of the launcher (``geomx-launch``, ``python -m geomx.launch``), two forms with a parser
each, chosen by ``--topology``:

* on this machine, ``geomx-launch [-p N -w N -s N ...] -- COMMAND`` (:func:`_machine_parser`), a
  :class:`~.topology.Topology`;
* from a topology file, ``geomx-launch --topology FILE [--site NAME[@HOST]] -- COMMAND``
  (:func:`_topology_parser`), a :class:`~.sitefile.SiteTopology`: every host over SSH, one site here, or
  ``--dry-run`` / ``--print-firewall``.

Both derive their processes from one :class:`~.layout.Layout`. Each parser knows the other form's flags
only to refuse them with a message naming the form they belong to.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import shlex
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from .. import __version__, config
from . import prometheus
from .layout import ProcessSpec
from .supervisor import log, run, run_processes
from .topology import Topology, free_port_range

#: Prefixes of the variables shown by ``--dry-run``.
DRY_RUN_PREFIXES = ("DMLC_", "GEOMX_", "ENABLE_", "MXNET_")


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _status_address(text: str) -> Tuple[str, int]:
    host, _, port = text.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected [HOST:]PORT, got {text!r}") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, got {number}")
    return host or "127.0.0.1", number


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _local_servers_arg(text: str) -> Union[int, List[int]]:
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or N0,N1,... (positive integers), got {text!r}") from None
    if min(counts) < 1:
        raise argparse.ArgumentTypeError(f"local server counts must be >= 1, got {text!r}")
    return counts[0] if len(counts) == 1 else counts


def _key_value(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected K=V, got {text!r}")
    return key, value


def _pattern_key_value(text: str):
    pattern, sep, kv = text.partition(":")
    if not sep or not pattern:
        raise argparse.ArgumentTypeError(f"expected PATTERN:K=V, got {text!r}")
    key, value = _key_value(kv)
    return pattern, key, value


class _OtherForm(argparse.Action):
    """A flag of the other command line: refused with ``message``, which names the form it belongs to."""

    def __init__(self, option_strings: Sequence[str], dest: str, message: str = "", **kwargs):
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        self.message = message

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(self.message)


#: The single-machine form's flags (a topology file says what they say).
_MACHINE_FLAGS = (("-p", "--parties"), ("-w", "--workers"), ("-s", "--global-servers"), ("-l", "--local-servers"),
                  ("-c", "--central-workers"), ("--host",), ("--env",), ("--node-env",), ("--node-command",),
                  ("--wan",), ("--separate-global-servers",), ("--curve",), ("--metrics-port",))
#: The topology-file form's own flags.
_TOPOLOGY_FLAGS = (("--site",), ("--print-firewall",), ("--ssh-config",))


def _new_parser(usage: str, description: str, epilog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="geomx-launch", usage=usage, description=description, epilog=epilog)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def _supervision_options(p: argparse.ArgumentParser, dry_run: str) -> None:
    """The flags both forms share: how the launcher supervises what it starts."""
    p.add_argument("--dry-run", action="store_true", help=dry_run)
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=None,
        metavar="SEC",
        help="stop everything after SEC (exit 124)",
    )
    p.add_argument(
        "--grace",
        type=_non_negative_float,
        default=30.0,
        metavar="SEC",
        help="after every worker succeeded, how long to wait for the other processes to exit (default 30)",
    )
    p.add_argument(
        "--log-dir",
        default=None,
        metavar="DIR",
        help="also write each process's raw output to DIR/<name>.log",
    )
    p.add_argument(
        "--status",
        default=None,
        type=_status_address,
        metavar="[HOST:]PORT",
        help="serve a live status page of the run at http://HOST:PORT/ (default host 127.0.0.1): sites, WAN "
        "links and their throughput, rounds, the party rounds wait for, accuracy, refusals and exits "
        "(docs/Observability.md). Every process serves its metrics for it",
    )
    p.add_argument(
        "--status-linger",
        type=_non_negative_float,
        default=0.0,
        metavar="SEC",
        help="with --status: keep serving the page SEC seconds after the run ended (default 0)",
    )
    p.add_argument(
        "--print-prometheus",
        action="store_true",
        help="print a Prometheus scrape configuration with every process's metrics listener, and exit "
        "(docs/Observability.md)",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def _machine_parser() -> argparse.ArgumentParser:
    """``geomx-launch [options] -- COMMAND``: a whole topology on this machine."""
    p = _new_parser(
        "%(prog)s [options] -- COMMAND ...",
        "Start a whole GeoMX topology (global scheduler/servers, a central party and P parties) on this "
        "machine. Workers run COMMAND, in which {slice}, {party} and {rank} are replaced by the worker's "
        "data-slice index, party index (or 'central') and rank.",
        "Across sites and hosts: geomx-launch --topology FILE [--site NAME | --dry-run | --print-firewall] -- "
        "COMMAND (geomx-launch --topology FILE --help).",
    )
    p.add_argument("-p", "--parties", type=_int_at_least(1), default=2, help="number of parties (default 2)")
    p.add_argument("-w", "--workers", type=_int_at_least(1), default=2, help="workers per party (default 2)")
    p.add_argument(
        "-s",
        "--global-servers",
        type=_int_at_least(1),
        default=1,
        help="number of global servers (default 1)",
    )
    p.add_argument(
        "-l",
        "--local-servers",
        type=_local_servers_arg,
        default=1,
        metavar="N|N0,N1,...",
        help="local servers per party: one count for every party or one per party (default 1)",
    )
    p.add_argument(
        "-c",
        "--central-workers",
        type=_int_at_least(0),
        default=0,
        help="training workers in the central party "
        "(default 0: only the master worker, which does not train)",
    )
    p.add_argument("--host", default="127.0.0.1",
                   help="address every process advertises and every listener binds (default 127.0.0.1)")
    p.add_argument(
        "--env",
        type=_key_value,
        action="append",
        default=[],
        metavar="K=V",
        help="extra variable for every process",
    )
    p.add_argument(
        "--node-env",
        type=_pattern_key_value,
        action="append",
        default=[],
        metavar="PATTERN:K=V",
        help="extra variable for the processes whose name matches the fnmatch PATTERN "
        "(e.g. 'party*/server:ENABLE_P3=1', 'global_server*:MXNET_KVSTORE_SIZE_LOWER_BOUND=1000')",
    )
    p.add_argument(
        "--node-command",
        default=None,
        metavar="CMD",
        help="command for the non-worker processes (shell-split; default: python -m geomx.node)",
    )
    p.add_argument(
        "--wan",
        default=None,
        metavar="SPEC",
        help="run on an emulated WAN (needs root): the central party and every party in its own network "
        "namespace, joined through a bridge by links capped with tbf. SPEC: RATE for every party link "
        "(e.g. 20mbit), and/or partyN=RATE, central=RATE (default uncapped), all=RATE, delay=MS "
        "(added one-way latency between data centers through a delaying relay; needs nft). "
        "Prints the bytes that crossed each link at the end (see geomx/testing/wan.py)",
    )
    p.add_argument(
        "--separate-global-servers",
        action="store_true",
        help="with --wan: each global server in a data center of its own (gs0, gs1, ...) with its own link "
        "at the central rate (or gsN=RATE), as with one machine per global server",
    )
    p.add_argument(
        "--curve",
        action="store_true",
        help="encrypt and authenticate every link with CURVE, using throwaway key pairs (one per data center) "
        "generated into a temporary directory and removed at exit",
    )
    p.add_argument(
        "--metrics-port",
        type=_int_at_least(1),
        default=None,
        metavar="BASE",
        help="every process serves /metrics (Prometheus) and /metrics.json: the n-th process in start order "
        "(as --dry-run lists them) on port BASE+n (docs/Observability.md)",
    )
    _supervision_options(p, "print the processes as shell lines and exit")
    for flags in _TOPOLOGY_FLAGS:
        p.add_argument(*flags, action=_OtherForm, message=f"{flags[-1]} needs --topology FILE")
    return p


def _topology_parser() -> argparse.ArgumentParser:
    """``geomx-launch --topology FILE ... -- COMMAND``: the sites and hosts of a topology file."""
    p = _new_parser(
        "%(prog)s --topology FILE [--site NAME[@HOST] | --print-firewall] [options] -- COMMAND ...",
        "Start the GeoMX topology a topology file places on sites and hosts: every host over SSH, or one "
        "site here (--site). Workers run COMMAND, in which {slice}, {party} and {rank} are replaced by the "
        "worker's data-slice index, party index (or 'central') and rank, and {python} by its host's interpreter.",
        "On one machine without a file: geomx-launch [-p N -w N ...] -- COMMAND (geomx-launch --help).",
    )
    p.add_argument(
        "--topology",
        required=True,
        metavar="FILE",
        help="a topology file (TOML; docs/Deployment.md, 'The topology file') placing the topology on sites and "
        "hosts. Without --site, --dry-run or --print-firewall: every process is started on its host over SSH",
    )
    p.add_argument(
        "--site",
        default=None,
        metavar="NAME[@HOST]",
        help="start only that site's processes, here (for a site on several hosts, only those placed on HOST: "
        "its SSH target or address)",
    )
    p.add_argument(
        "--ssh-config",
        default=None,
        metavar="FILE",
        help="without --site: the OpenSSH client configuration (ssh -F FILE) for reaching the hosts",
    )
    p.add_argument(
        "--print-firewall",
        action="store_true",
        help="print, per site, the ports its hosts must accept and from which sites, and exit",
    )
    _supervision_options(p, "print the processes as shell lines, per host, and exit")
    for flags in _MACHINE_FLAGS:
        p.add_argument(*flags, action=_OtherForm,
                       message=f"{'/'.join(flags)} cannot be combined with --topology (the topology file says it)")
    return p


def _names_a_topology(options: Sequence[str]) -> bool:
    """Whether the options (before ``--``) choose the topology-file form: ``--topology`` given, as argparse
    reads it (``--topology FILE``, ``--topology=FILE`` or an abbreviation such as ``--topo``)."""
    return any(len(flag) >= len("--to") and "--topology".startswith(flag)
               for flag in (option.split("=", 1)[0] for option in options if option.startswith("--")))


def _dry_run_lines(specs: List[ProcessSpec], explicit_keys: Sequence[str] = ()) -> List[str]:
    lines = []
    for spec in specs:
        keys = sorted(k for k in spec.env if k.startswith(DRY_RUN_PREFIXES) or k in explicit_keys)
        assigns = " ".join(f"{k}={shlex.quote(spec.env[k])}" for k in keys)
        lines.append(f"# {spec.name}{' (worker)' if spec.is_worker else ''}")
        lines.append(f"{assigns} {shlex.join(spec.argv)}".strip())
    return lines


def _over_ssh_restart(spec: ProcessSpec, over_ssh: Callable[[ProcessSpec], ProcessSpec]
                      ) -> Optional[Tuple[ProcessSpec, float]]:
    again = spec.restart() if spec.restart is not None else None
    return None if again is None else (over_ssh(again[0]), again[1])


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        return _main(argv)
    except config.ConfigError as exc:  # a variable the launcher reads (GEOMX_LOST_PARTY, ...) is wrong
        print(f"geomx-launch: {exc}", file=sys.stderr)
        return 2


def _main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    options, command = argv, None
    if "--" in argv:
        idx = argv.index("--")
        options, command = argv[:idx], argv[idx + 1:]
    topology_form = _names_a_topology(options)
    parser = _topology_parser() if topology_form else _machine_parser()
    args = parser.parse_args(options)
    if command is None:
        command = list(args.command)
    elif args.command:
        parser.error(f"unexpected arguments before '--': {shlex.join(args.command)}")
    if topology_form:
        return _main_topology(parser, args, command)
    return _main_machine(parser, args, command)


def _main_machine(parser: argparse.ArgumentParser, args, command: List[str]) -> int:
    """``geomx-launch [options] -- COMMAND``: the topology on this machine."""
    if not command:
        parser.error("the following arguments are required: COMMAND (give it after '--')")
    node_env: Dict[str, Dict[str, str]] = {}
    for pattern, key, value in args.node_env:
        node_env.setdefault(pattern, {})[key] = value
    topology = Topology(
        parties=args.parties,
        workers_per_party=args.workers,
        global_servers=args.global_servers,
        central_workers=args.central_workers,
        local_servers=args.local_servers,
        separate_global_servers=args.separate_global_servers,
        host=args.host,
        env=dict(args.env),
        node_env=node_env,
        node_command=shlex.split(args.node_command) if args.node_command is not None else None,
        metrics_base=args.metrics_port,
    )
    if (args.status is not None or _Watch.terminal()) and topology.metrics_base is None:
        # The page and the progress line read every process's metrics: free ports for them.
        topology.metrics_base = free_port_range(topology.num_processes, topology.host)
    if args.metrics_port is not None and args.metrics_port + topology.num_processes - 1 > 65535:
        parser.error(f"--metrics-port {args.metrics_port}: its {topology.num_processes} ports run past 65535")
    if args.print_prometheus:
        if args.metrics_port is None:
            parser.error("--print-prometheus needs --metrics-port BASE (the ports it would list)")
        print(prometheus.scrape_config(prometheus.targets_of(topology.processes(command or ["COMMAND"]))), end="")
        return 0

    wan_spec = None
    if args.wan is not None:
        # Imported only for --wan: the harness is not part of the runtime (no MXNet import there either).
        from ..testing import wan as wanmod

        try:
            wan_spec = wanmod.parse_spec(args.wan, args.parties, topology.global_server_dcs)
        except wanmod.WanError as exc:
            print(f"geomx-launch: --wan: {exc}", file=sys.stderr)
            return 2

    if args.curve:
        curve_tmp = tempfile.TemporaryDirectory(prefix="geomx-curve-")
        atexit.register(curve_tmp.cleanup)
        topology.make_curve_keys(curve_tmp.name)

    if args.dry_run:
        if wan_spec is not None:
            # Show the placement the WAN would get (nothing is built).
            plan = wanmod.Wan(wanmod.dc_names(args.parties, topology.global_server_dcs), wan_spec, "<wan>",
                              wanmod.DEFAULT_SUBNET)
            _place_on_wan(topology, plan)
            print(f"# emulated WAN: {plan.describe()}")
        explicit = {k for k, _ in args.env} | {k for _, k, _ in args.node_env}
        for line in _dry_run_lines(topology.processes(command), explicit):
            print(line)
        return 0

    _log_to_stderr()
    with _Watch(args, metrics=topology.metrics_base is not None) as watch:
        if wan_spec is None:
            return run(topology, command, timeout=args.timeout, log_dir=args.log_dir, grace=args.grace,
                       stream=watch, observer=watch.start)
        return _run_on_wan(topology, command, wan_spec, args, watch)


def _place_on_wan(topology: Topology, wan) -> None:
    """Point every data center of ``topology`` at its namespace of ``wan``."""
    topology.dc_hosts = {dc: wan.address(dc) for dc in wan.dcs}
    topology.dc_prefix = {dc: wan.exec_argv(dc) for dc in wan.dcs}


def _run_on_wan(topology: Topology, command: Sequence[str], spec, args, watch: "_Watch") -> int:
    from ..testing import wan as wanmod

    try:
        w = wanmod.Wan.create(wanmod.dc_names(topology.parties, topology.global_server_dcs), spec)
    except wanmod.WanError as exc:
        print(f"geomx-launch: --wan: {exc}", file=sys.stderr)
        return 2
    status = 1
    t0 = time.monotonic()
    try:
        with w:
            log.info("emulated WAN: %s", w.describe())
            _place_on_wan(topology, w)
            try:
                status = run(topology, command, timeout=args.timeout, log_dir=args.log_dir, grace=args.grace,
                             stream=watch, observer=watch.start)
            finally:
                try:
                    elapsed = time.monotonic() - t0
                    report = w.report(elapsed)
                    print(f"[launch] WAN bytes per link over {elapsed:.1f} s:\n{report}", file=sys.stderr)
                except wanmod.WanError as exc:
                    log.error("could not read the WAN counters: %s", exc)
    except SystemExit as exc:  # SIGTERM/SIGHUP while the WAN existed (see geomx.testing.wan)
        code = exc.code if isinstance(exc.code, int) else 1
        log.error("launcher received a termination signal; topology stopped, WAN torn down")
        return code
    return status


class _Watch:
    """What a person sees of a run beyond the processes' output: ``--status``'s page, and on a terminal
    the progress line (:mod:`.progress`). Both start once the process list exists (``start`` is the
    supervisor's observer factory); this object is the supervisor's output stream, which the progress
    line shares. The page is served ``--status-linger`` seconds after the run."""

    def __init__(self, args, metrics: bool) -> None:
        self.address = args.status
        self.linger = args.status_linger
        self.progress_wanted = metrics and self.terminal()
        self.page = None
        self.progress = None

    @staticmethod
    def terminal() -> bool:
        return sys.stdout.isatty()

    def __enter__(self) -> "_Watch":
        return self

    def start(self, specs: List[ProcessSpec]):
        if self.address is None and not self.progress_wanted:
            return None
        from .progress import Progress
        from .status import StatusPage

        host, port = self.address if self.address is not None else ("127.0.0.1", None)
        self.page = StatusPage.of_processes(specs, host, port)  # it logs its address
        if not self.progress_wanted:
            return self.page
        self.progress = Progress(sys.stdout, self.page)
        return self.progress

    def write(self, text: str) -> None:
        (self.progress or sys.stdout).write(text)

    def flush(self) -> None:
        sys.stdout.flush()

    def __exit__(self, *exc: object) -> None:
        if self.page is None:
            return
        try:
            if self.linger > 0 and self.address is not None:
                print(f"[launch] the status page stays at {self.page.url} for {self.linger:g} s", file=sys.stderr,
                      flush=True)
                time.sleep(self.linger)  # what --status-linger asks for; Ctrl-C ends it
        except KeyboardInterrupt:
            pass
        finally:
            self.page.close()


def _main_topology(parser: argparse.ArgumentParser, args, command: List[str]) -> int:
    """``geomx-launch --topology FILE``: over SSH, one site here (``--site``), ``--dry-run`` or
    ``--print-firewall``."""
    from .sitefile import TopologyFileError, load

    try:
        topo = load(args.topology)
    except TopologyFileError as exc:
        print(f"geomx-launch: {exc}", file=sys.stderr)
        return 2
    if args.print_firewall:
        for line in topo.firewall():
            print(line)
        return 0
    if args.print_prometheus:
        if not topo.metrics:
            print(f"geomx-launch: {args.topology}: --print-prometheus needs `metrics = true` in the topology file",
                  file=sys.stderr)
            return 2
        print(prometheus.scrape_config(prometheus.targets_of(topo.processes(command or ["COMMAND"]))), end="")
        return 0
    if not command:
        parser.error("the following arguments are required: COMMAND (give it after '--')")
    try:
        specs = topo.processes(command)
        if args.site is not None:
            specs = _site_processes(topo, specs, args.site)
    except TopologyFileError as exc:
        print(f"geomx-launch: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        for line in _dry_run_hosts(topo, specs):
            print(line)
        return 0
    if args.site is not None and topo.auto_keys:
        print(f"geomx-launch: {args.topology}: the topology spans several hosts and runs with CURVE, whose keys "
              f"the launcher generates only when it starts every site over SSH: for --site, set keys_dir (every "
              f"site's key pair, geomx-keys generate) or security = \"none\"", file=sys.stderr)
        return 2
    _log_to_stderr()
    warning = topo.insecure_warning()
    if warning:
        log.warning("%s", warning)
    if args.status is not None and not topo.metrics:
        print(f"geomx-launch: {args.topology}: --status needs `metrics = true` in the topology file (the page reads "
              f"every process's metrics)", file=sys.stderr)
        return 2
    with _Watch(args, metrics=topo.metrics) as watch:
        if args.site is None:
            return _run_over_ssh(topo, command, args, watch)
        return run_processes(specs, f"site {args.site} of {args.topology}", timeout=args.timeout,
                             log_dir=args.log_dir, grace=args.grace, stream=watch, observer=watch.start(specs))


def _run_over_ssh(topo, command: List[str], args, watch: "_Watch") -> int:
    """Every process on its host, one SSH session each over one connection per host."""

    from .ssh import Connections, SSHError, remote_command

    pythons = {h.ssh: h.python for h in topo.hosts}
    keys = None
    try:
        conns = Connections([h.ssh for h in topo.hosts], config=args.ssh_config,
                            silent_for=max(config.outage_window({**topo.env, **s.env}) for s in topo.sites))
    except SSHError as exc:
        log.error("%s", exc)
        return 255
    try:
        try:
            conns.open()
            if topo.auto_keys:
                keys = conns.generate_keys([(s.name, s.host.ssh) for s in topo.sites], pythons)
                log.info("CURVE keys of this run: %s on every host (each site's secret key made on its host)",
                         keys)
        except SSHError as exc:
            log.error("%s; nothing was started", exc)
            return 255
        specs = topo.processes(command, keys_dir=keys)

        def over_ssh(spec: ProcessSpec) -> ProcessSpec:
            # The SSH client gets the launcher's environment (set for the child, not read here).
            wrapped = ProcessSpec(spec.name, conns.argv(spec.host, remote_command(spec, _explicit_keys(topo, spec),
                                                                                  pythons[spec.host])),
                                  config.inherited_environment(), spec.is_worker, spec.dc, host=spec.host,
                                  site=spec.site,
                                  keep_stdin=True, party=spec.party, party_may_be_lost=spec.party_may_be_lost)
            if spec.restart is not None:
                wrapped.restart = lambda: _over_ssh_restart(spec, over_ssh)
            if spec.rejoin is not None:
                wrapped.rejoin = lambda n: over_ssh(spec.rejoin(n))  # type: ignore[misc]
            return wrapped

        remote = [over_ssh(spec) for spec in specs]
        hosts = ", ".join(conns.hosts)
        security = "CURVE (keys generated on each site's host)" if keys else \
            "CURVE (keys_dir)" if topo.security == "curve" else "no encryption"
        return run_processes(remote, f"{args.topology} over SSH on {hosts}, {security}", timeout=args.timeout,
                             log_dir=args.log_dir, grace=args.grace, stream=watch, observer=watch.start(specs))
    finally:
        if keys is not None:
            conns.remove(keys)
        conns.close()


def _explicit_keys(topo, spec: ProcessSpec) -> List[str]:
    """The variables of ``spec`` that the launcher or the file sets (not those it inherited)."""
    shown = set(topo.env) | {"PYTHONUNBUFFERED"}
    for site in topo.sites:
        shown |= set(site.env)
        for extra in list(site.role_env.values()) + list(topo.role_env.values()):
            shown |= set(extra)
    return sorted(k for k in spec.env if k.startswith(DRY_RUN_PREFIXES) or k in shown)


def _site_processes(topo, specs: List[ProcessSpec], which: str) -> List[ProcessSpec]:
    """The processes ``--site NAME[@HOST]`` starts."""
    from .sitefile import TopologyFileError

    name, _, host = which.partition("@")
    site = topo.site(name)
    mine = [s for s in specs if s.site == site.name]
    if host:
        known = {h.ssh: h for h in site.hosts}
        known.update({h.address: h for h in site.hosts})
        if host not in known:
            raise TopologyFileError(f"{topo.path}: site {name!r} has no host {host!r} (its hosts: "
                                    f"{', '.join(h.ssh for h in site.hosts)})")
        return [s for s in mine if s.host == known[host].ssh]
    if len(site.hosts) > 1:
        raise TopologyFileError(f"{topo.path}: site {name!r} spans several hosts "
                                f"({', '.join(h.ssh for h in site.hosts)}): start each with --site {name}@HOST")
    return mine


def _dry_run_hosts(topo, specs: List[ProcessSpec]) -> List[str]:
    """Per host, each process as one shell line: ``cd WORKDIR && env VAR=... argv``."""
    lines: List[str] = []
    hosts: Dict[str, List[ProcessSpec]] = {}
    for spec in specs:
        hosts.setdefault(spec.host, []).append(spec)
    if topo.security == "curve":
        lines.append("# CURVE: every host needs its site's GEOMX_CURVE_SECRET_KEY file and, in "
                     "GEOMX_CURVE_PUBLIC_KEYS_DIR, every site's public key (geomx-keys generate)")
    for host, mine in hosts.items():
        lines.append(f"# ---- host {host} (site {mine[0].site})")
        for spec in mine:
            keys = [k for k in _explicit_keys(topo, spec) if k != "PYTHONUNBUFFERED"]
            assigns = " ".join(f"{k}={shlex.quote(spec.env[k])}" for k in keys)
            cd = f"cd {shlex.quote(spec.cwd)} && " if spec.cwd else ""
            lines.append(f"# {spec.name}{' (worker)' if spec.is_worker else ''}")
            lines.append(f"{cd}env {assigns} {shlex.join(spec.argv)}")
    return lines


def _log_to_stderr() -> None:
    if not logging.getLogger().handlers and not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[launch] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
