"""Exceptions raised by geomx; every one names what went wrong and where."""


class GeoMXError(RuntimeError):
    """Base class of geomx's own errors."""


class ConfigError(GeoMXError):
    """A missing or inconsistent environment variable (the message names it and the role)."""


class ProtocolError(GeoMXError):
    """A received message failed validation; the node drops it and keeps serving."""


class PeerDeadError(GeoMXError):
    """A peer stopped responding (no heartbeat within the timeout) or announced a failure."""


class SecurityError(GeoMXError):
    """A peer refused this node's CURVE handshake (unknown key, wrong key, or CURVE on one side only)."""


class RemoteError(GeoMXError):
    """A server answered a request with an error (bad key, shape mismatch, unknown optimizer...)."""


def internal_error(exc: BaseException, doing: str = "") -> str:
    """What a peer is told of an unexpected exception while handling its request (``doing``: e.g.
    "while answering"): one line, the exception's type and its last line (MXNet's errors carry a whole
    traceback and put the cause, e.g. ``Check failed: ...``, last; the full text goes to the node's own
    log)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"internal error{' ' + doing if doing else ''}: {type(exc).__name__}: {lines[-1] if lines else repr(exc)}"
