"""CURVE encryption and authentication of geomx's ZeroMQ links, and the ``geomx-keys`` command.

Trust model: a *party* (a data center: the central party or a participating one) is the unit of
trust. Every process of a party uses the party's one key pair, and every party holds an allow-list
directory with the public keys of the parties it works with (its own included). Then:

* a listening socket (scheduler, server) is a CURVE server with its party's secret key. A listener
  inside the party (its scheduler, its local server's client port, the central party's scheduler and
  the global servers' central port) admits only the party's own key; a listener other parties reach
  (the global scheduler, the global servers' client port) admits the keys in the allow-list. The ZAP
  handler below checks this per listener (its ZAP domain) and logs every refusal with the client's
  address and key. An admitted connection's messages carry its key's name (ZAP User-Id), which the
  schedulers bind to the registration and the servers check on every request;
* a connecting socket knows which party it connects to, so it knows that party's public key: inside
  a party it is its own, across parties (a local server to the global scheduler and global servers)
  it is the central party's, found in the allow-list by name (``GEOMX_CURVE_CENTRAL_KEY``).

Key files are ZeroMQ certificates (``NAME.key`` public, ``NAME.key_secret`` both halves), as written
by ``geomx-keys generate`` (``python -m geomx.security generate``).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple

import zmq
import zmq.auth
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger("geomx.security")

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by the ZAP protocol (RFC 27)


class KeyFileError(ValueError):
    """A key file or directory that cannot be used (the message says which and why)."""


@dataclasses.dataclass(frozen=True)
class CurveKeys:
    """This node's party key pair, the parties it admits, and the key of the party it connects to
    across parties (the central party's)."""

    public: bytes  # Z85, 40 bytes
    secret: bytes
    allowed: Mapping[bytes, str]  # public key (Z85) -> name (file stem), own key included
    central: bytes  # the central party's public key (this party's own in the central party)
    inside_party: bool = True  # also encrypt links inside the party

    def name_of(self, public: bytes) -> Optional[str]:
        return self.allowed.get(public)


# -- key files ------------------------------------------------------------------------------------

def generate(directory: str, name: str, force: bool = False) -> Tuple[Path, Path]:
    """Write a new key pair ``DIR/NAME.key`` (public) and ``DIR/NAME.key_secret`` (mode 0600)."""
    if not name or "/" in name or name.startswith("."):
        raise KeyFileError(f"bad key name {name!r}: use a plain file name such as party0")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    public, secret = out / (name + PUBLIC_SUFFIX), out / (name + SECRET_SUFFIX)
    if not force and (public.exists() or secret.exists()):
        raise KeyFileError(f"{public} or {secret} exists already (use --force to replace them)")
    # Create the secret file private before anything is written into it.
    old = os.umask(0o077)
    try:
        zmq.auth.create_certificates(str(out), name)
    finally:
        os.umask(old)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    return public, secret


def load_secret(path: str) -> Tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read the key file {path!r}: {exc}") from None
    if secret is None:
        raise KeyFileError(f"{path!r} holds no secret key (give the NAME{SECRET_SUFFIX} file, not NAME{PUBLIC_SUFFIX})")
    _check_z85(public, path)
    _check_z85(secret, path)
    return public, secret


def load_allow_list(directory: str) -> Dict[bytes, str]:
    """public key -> name for every ``*.key`` file in ``directory``."""
    path = Path(directory)
    if not path.is_dir():
        raise KeyFileError(f"{directory!r} is not a directory")
    allowed: Dict[bytes, str] = {}
    for file in sorted(path.glob("*" + PUBLIC_SUFFIX)):
        try:
            public, _ = zmq.auth.load_certificate(str(file))
        except (OSError, ValueError) as exc:
            raise KeyFileError(f"cannot read the public key {str(file)!r}: {exc}") from None
        _check_z85(public, str(file))
        allowed[public] = file.name[: -len(PUBLIC_SUFFIX)]
    if not allowed:
        raise KeyFileError(f"{directory!r} holds no public key files (*{PUBLIC_SUFFIX})")
    return allowed


def _check_z85(key: bytes, where: str) -> None:
    try:
        ok = len(z85.decode(key)) == 32
    except (ValueError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise KeyFileError(f"{where!r} does not hold a valid CURVE key")


def load(secret_path: str, public_dir: Optional[str], central_name: Optional[str],
         inside_party: bool) -> CurveKeys:
    """This node's keys. ``public_dir`` is None for a node that only connects inside its party (a
    worker); ``central_name`` is None when this node belongs to the central party."""
    public, secret = load_secret(secret_path)
    allowed = load_allow_list(public_dir) if public_dir is not None else {}
    own_name = Path(secret_path).name
    own_name = own_name[: -len(SECRET_SUFFIX)] if own_name.endswith(SECRET_SUFFIX) else own_name
    allowed.setdefault(public, own_name)
    central = public
    if central_name is not None:
        matches = [k for k, n in allowed.items() if n == central_name]
        if not matches:
            raise KeyFileError(f"no public key named {central_name!r} ({central_name}{PUBLIC_SUFFIX}) in "
                               f"{public_dir!r}")
        central = matches[0]
    return CurveKeys(public, secret, dict(allowed), central, inside_party)


# -- sockets ----------------------------------------------------------------------------------------

_warned_insecure = False


def warn_insecure(link_name: str) -> None:
    """Once per process: a link to another party runs in clear (no keys configured)."""
    global _warned_insecure
    if not _warned_insecure:
        _warned_insecure = True
        log.warning("INSECURE: CURVE is off (GEOMX_CURVE_SECRET_KEY is not set): the links to other parties "
                    "(here %s) are neither encrypted nor authenticated; see docs/Deployment.md (Security)",
                    link_name)


def uses_curve(keys: Optional[CurveKeys], cross_party: bool) -> bool:
    return keys is not None and (cross_party or keys.inside_party)


def secure_server(sock: zmq.Socket, keys: CurveKeys, domain: str) -> None:
    sock.curve_server = True
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.zap_domain = domain.encode()
    # Refuse every client if no ZAP handler answers, rather than admit them all.
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


def secure_client(sock: zmq.Socket, keys: CurveKeys, cross_party: bool) -> None:
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = keys.central if cross_party else keys.public


class RateLimitedLog:
    """Log a repeated refusal once per ``interval`` seconds (a peer retrying in a loop, or a flood of
    hostile connections, must not flood the log), counting what was left out.

    Refusals are counted per ``key``: the caller's (peer, kind), where the kind is the text's
    :func:`template` (numbers and quoted parts, which come from the peer's bytes, replaced), so that a
    flood of distinct bad messages from one peer is one log line per interval, not one each. At most
    ``max_keys`` keys are remembered (peers choose their identities too); beyond that, refusals of
    new keys share one more."""

    OVERFLOW = ("(more peers and kinds than the refusal log tracks)",)

    def __init__(self, interval: float = 5.0, max_keys: int = 4096):
        self.interval = interval
        self.max_keys = max_keys
        self._last: Dict[object, Tuple[float, int]] = {}

    def __call__(self, level: int, text: str, key: object = None) -> None:
        now = time.monotonic()
        key = template(text) if key is None else key
        if key not in self._last and len(self._last) >= self.max_keys:
            # Forget the keys whose interval is over (their skipped counts are lost, not their peers'
            # next refusals); if none is, the new key shares the overflow entry.
            for old in [k for k, (t, _) in self._last.items() if now - t >= self.interval]:
                del self._last[old]
            if len(self._last) >= self.max_keys:
                key = self.OVERFLOW
        last, skipped = self._last.get(key, (-1e9, 0))
        if now - last < self.interval:
            self._last[key] = (last, skipped + 1)
            return
        self._last[key] = (now, 0)
        log.log(level, "%s%s", text, f" ({skipped} more like it since)" if skipped else "")


_PEER_BYTES = re.compile(r"b?'(?:[^'\\]|\\.)*'|b?\"(?:[^\"\\]|\\.)*\"|[-+]?\d[\w.+-]*")


def template(text: str) -> str:
    """``text`` with what a peer chose (numbers, quoted strings and bytes) replaced by ``#``, cut to
    120 characters: the kind of a refusal, as a rate-limit key."""
    return _PEER_BYTES.sub("#", text)[:120]


_UNIX_PEER = re.compile(r"localhost:(\d+):(\d+):(\d+)")


def describe_zap_address(address: str) -> str:
    """The client a ZAP request names: an IP address for TCP; for a Unix-domain socket (GEOMX_LOCAL_IPC)
    libzmq gives ``localhost:UID:GID:PID`` from the socket's peer credentials."""
    unix = _UNIX_PEER.fullmatch(address)
    if unix is None:
        return address
    uid, _gid, pid = unix.groups()
    return f"a local process (pid {pid}, uid {uid}) over a Unix-domain socket"


class ZapHandler:
    """Answers libzmq's authentication requests (ZAP, RFC 27) for every CURVE server socket of a
    context, from the node's event loop: admits the public keys in the allow-list and logs every
    refusal with the client's address and key."""

    def __init__(self, ctx: zmq.Context, keys: CurveKeys, node: str):
        self.keys = keys
        self.node = node
        self.sock = ctx.socket(zmq.REP)
        self.sock.linger = 0
        self.sock.bind(ZAP_ENDPOINT)
        self.refusals = RateLimitedLog()
        # ZAP domain (the listener's name) -> whether other parties may connect to it. A domain not
        # declared here is refused: every CURVE listener of the node must say who it serves.
        self.domains: Dict[str, bool] = {}
        own = keys.name_of(keys.public)
        self.own_name = own if own is not None else "this party"

    def serve(self, domain: str, cross_party: bool) -> None:
        """Declare a listener: ``cross_party`` ones admit the allow-list, the others this party's key only."""
        if self.domains.get(domain, cross_party) != cross_party:
            raise ValueError(f"two listeners named {domain!r} with different admission rules")
        self.domains[domain] = cross_party

    def handle(self) -> None:
        for _ in range(64):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.sock.send_multipart(self._answer(frames))

    def _answer(self, frames) -> list:
        if len(frames) < 6:
            return [b"1.0", b"", b"500", b"malformed ZAP request", b"", b""]
        version, request_id, domain, address, _identity, mechanism = frames[:6]
        credentials = frames[6:]
        where = domain.decode(errors="replace") or "?"
        peer = describe_zap_address(address.decode(errors="replace"))
        if mechanism == b"NULL":
            # A link deliberately left in clear (GEOMX_CURVE_INSIDE_PARTY=0); CURVE listeners never ask.
            return [version, request_id, b"200", b"OK", b"", b""]
        if mechanism == b"CURVE" and credentials and len(credentials[0]) == 32:
            public = z85.encode(credentials[0])
            name = self.keys.name_of(public)
            cross_party = self.domains.get(where)
            if cross_party is None:
                self.refusals(logging.ERROR, f"{self.node}: REFUSED a connection to the unknown listener {where} "
                                             f"from {peer}", key=(peer, "unknown domain"))
                return [version, request_id, b"400", b"unknown listener", b"", b""]
            if name is not None and not cross_party and public != self.keys.public:
                # Another party's key: it opens the global tier's listeners, never this party's own.
                self.refusals(logging.ERROR,
                              f"{self.node}: REFUSED a connection to {where} from {peer}: its key {name} belongs "
                              f"to another party; only {self.own_name}'s own key opens this party's listeners",
                              key=(peer, where, name))
                return [version, request_id, b"400", b"another party's key", b"", b""]
            if name is not None:
                log.debug("%s: %s admitted %s (key %s)", self.node, where, peer, name)
                return [version, request_id, b"200", b"OK", name.encode(), b""]
            self.refusals(logging.ERROR,
                          f"{self.node}: REFUSED a connection to {where} from {peer}: its public key "
                          f"{public.decode()} is not in the allow-list (GEOMX_CURVE_PUBLIC_KEYS_DIR)",
                          key=(peer, where, "unknown key"))
            return [version, request_id, b"400", b"public key not in the allow-list", b"", b""]
        self.refusals(logging.ERROR, f"{self.node}: REFUSED a {mechanism.decode(errors='replace')} connection "
                                     f"to {where} from {peer}", key=(peer, where, "mechanism"))
        return [version, request_id, b"400", b"mechanism not allowed", b"", b""]

    def close(self) -> None:
        self.sock.close(linger=0)


# Handshake events a monitored socket reports.
MONITORED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
             | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED)


def handshake_failure(frames, *, server: bool, curve: bool, link_name: str, peer: str) -> Optional[str]:
    """The reason a handshake failed, from a socket-monitor message of a listener (``server``) or of a
    client link (which uses ``curve`` or not); None for other events."""
    event = parse_monitor_message(frames)
    kind, value = event["event"], event["value"]
    if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        if server:
            return None  # the ZAP handler has logged it, with the address and the key
        return (f"{peer} REFUSED this node's CURVE key (status {value}): this party's public key is not in "
                f"its allow-list (GEOMX_CURVE_PUBLIC_KEYS_DIR there)")
    if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        if server:
            return f"{link_name}: REFUSED a connection that does not use CURVE (a peer without keys configured)"
        return (f"the CURVE handshake with {peer} failed: one side uses CURVE and the other does not "
                f"(set GEOMX_CURVE_SECRET_KEY on both, or on neither)")
    if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
        if server:
            return (f"{link_name}: REFUSED a CURVE handshake that did not decrypt (the peer uses another "
                    f"public key for this party)")
        return None  # the client side of this failure is reported as NO_DETAIL, below
    if kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and not server:
        # The peer closed the connection during the handshake: it could not decrypt it, or it does not
        # use CURVE and closed before saying so (which of the two events comes first is a race).
        if curve:
            return (f"the CURVE handshake with {peer} failed: it expects another key for this party, or it "
                    f"runs without CURVE (check GEOMX_CURVE_CENTRAL_KEY, the key files, and GEOMX_CURVE_SECRET_KEY "
                    f"there)")
        return (f"the handshake with {peer} keeps failing: it probably uses CURVE and this node does not "
                f"(set GEOMX_CURVE_SECRET_KEY on both, or on neither)")
    if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return f"{link_name}: a handshake failed (ZMTP protocol error {value:#x})"
    # A server's NO_DETAIL is a client that went away mid-handshake (e.g. after its own refusal).
    return None


# -- command line -----------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    from . import __version__

    p = argparse.ArgumentParser(prog="geomx-keys", description="CURVE key pairs for geomx parties.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write a party's key pair NAME.key (public) and NAME.key_secret")
    gen.add_argument("--dir", required=True, help="directory to write the two files into")
    gen.add_argument("--name", required=True, help="the party's name (e.g. central, party0)")
    gen.add_argument("--force", action="store_true", help="replace an existing key pair")
    show = sub.add_parser("show", help="print the public key held in a key file")
    show.add_argument("file")
    args = p.parse_args(argv)
    try:
        if args.command == "generate":
            public, secret = generate(args.dir, args.name, args.force)
            print(f"public key (give it to the other parties): {public}")
            print(f"secret key (keep it in this party; GEOMX_CURVE_SECRET_KEY): {secret}")
        else:
            public, _ = zmq.auth.load_certificate(args.file)
            print(public.decode())
    except (KeyFileError, OSError, ValueError) as exc:
        print(f"geomx-keys: {exc}", file=sys.stderr)
        return 2
    return 0


def generate_topology_keys(directory: str, names: Sequence[str]) -> None:
    """Throwaway keys for a local topology: one pair per data center, all in one directory (which is
    then every party's allow-list too)."""
    for name in names:
        generate(directory, name, force=True)


if __name__ == "__main__":
    sys.exit(main())
