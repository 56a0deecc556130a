"""Parameter servers: the local server of a party and the global server of the central party."""
from .global_server import GlobalServer
from .local_server import LocalServer

__all__ = ["LocalServer", "GlobalServer"]
