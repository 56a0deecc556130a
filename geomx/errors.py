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
