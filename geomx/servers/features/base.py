"""What a server feature is (:class:`ServerFeature`) and how a server calls the features attached to it
(:class:`Features`).

A feature attaches to a server through one interface: the message types and commands it handles, what
it refuses of a data-path request, which key state a request works on, a push it takes before the
round engine, what it adds to a reply, and hooks at round completion and at the server's stops. Every
hook has a default that does nothing, so a feature overrides only what it uses; the round engine
(geomx/servers/base.py) calls the hooks through :class:`Features` and tests no feature's flag.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar

import numpy as np

from ...errors import GeoMXError, ProtocolError
from ...wire import Message, MsgType

if TYPE_CHECKING:  # the servers import this module
    from ...metrics import Sample
    from ...transport import Link, Origin
    from ..base import Client, ServerBase
    from ..keystate import KeyState

# A message a feature takes before the round engine: (message, its origin, whether its parts' CURVE keys
# were checked already) -> True when taken (False: the server handles it as any other).
Handler = Callable[[Message, "Origin", bool], bool]
# A command a feature answers: (message, link, identity, from the master worker).
CommandHandler = Callable[[Message, "Link", bytes, bool], None]

F = TypeVar("F", bound="ServerFeature")


class ServerFeature:
    """One feature of a server (DGT reception, the TSEngine root, checkpoints, P3 slices, replay),
    made for one server (``server``) when the configuration switches it on, and registered in
    geomx/servers/features/__init__.py (``FEATURES``)."""

    name: ClassVar[str] = ""
    #: Message types this feature takes before the round engine (and before the check that the
    #: sender is a registered client): :meth:`handle` gets them.
    messages: ClassVar[Tuple[MsgType, ...]] = ()
    #: Commands (geomx/commands.py) this feature answers, each by its handler, called as
    #: ``handler(feature, msg, link, identity, master)`` (as ``GlobalServer.COMMANDS``).
    commands: ClassVar[Mapping[str, Callable[..., None]]] = {}
    #: What a server that could have this feature but has it off says of its :attr:`messages` and
    #: :attr:`commands` (formatted with the server as ``server``); None: it handles them as any other.
    off: ClassVar[Optional[str]] = None
    #: The feature needs each key's rounds whole: the global server asks for no cut-through slices.
    whole_keys: ClassVar[bool] = False

    def __init__(self, server: "ServerBase"):
        self.server = server

    def handle(self, msg: Message, origin: "Origin", key_checked: bool) -> bool:
        """One of :attr:`messages` from ``origin`` (``key_checked``: its parts' CURVE keys were checked
        as they arrived); True when taken here (False: the server handles it as usual)."""
        return False

    def refuse(self, msg: Message, ks: "KeyState") -> Optional[str]:
        """Why this feature refuses a data-path request (PUSH, PUSHPULL, PULL) of the key state ``ks``,
        or None. The server answers it with the error, prefixed by the key."""
        return None

    def state_for(self, msg: Message, ks: "KeyState") -> "KeyState":
        """The key state a data-path request that no feature refused works on (``ks``: the key's)."""
        return ks

    def take_push(self, msg: Message, ks: "KeyState", client: "Client", link: "Link", identity: bytes) -> bool:
        """A push of ``ks`` before it joins a round: True when this feature answered it instead."""
        return False

    def reply_meta(self, req: Message, client: "Client", meta: Dict[str, Any]) -> None:
        """Add what a data-path reply to ``req`` carries for this feature to ``meta`` (when it is sent)."""

    def on_round_complete(self, ks: "KeyState", r: Optional[int], value: np.ndarray) -> None:
        """Round ``r`` of ``ks`` is complete and ``value`` is the key's new value (``r`` None: an update
        applied outside rounds, MixedSync's)."""

    def on_client_stop(self, client: "Client") -> None:
        """``client`` sent STOP (before it is answered)."""

    def on_all_stopped(self) -> None:
        """Every client of the server stopped."""

    def on_leave(self, reason: str, failed: bool) -> None:
        """The server is about to exit (``failed``: because the run failed), before it refuses the
        requests still waiting."""

    def samples(self) -> List["Sample"]:
        """The feature's figures for the server's metrics (geomx/metrics.py's CATALOGUE names them)."""
        return []


def _overriding(features: Sequence[ServerFeature], hook: str) -> List[Callable[..., Any]]:
    """The features' own implementations of ``hook`` (the defaults that do nothing are left out)."""
    default = getattr(ServerFeature, hook)
    return [getattr(f, hook) for f in features if getattr(type(f), hook) is not default]


class Features:
    """The features attached to one server, in their order in ``FEATURES``, and each hook gathered from
    the features that implement it; ``off``: the features the server could have but that are off (what
    it says of their messages and commands)."""

    def __init__(self, server: "ServerBase", attached: Sequence[ServerFeature] = (),
                 off: Sequence[Type[ServerFeature]] = ()):
        self.server = server
        self.attached: Tuple[ServerFeature, ...] = tuple(attached)
        #: Message type -> the handler that takes it before the round engine.
        self.handlers: Dict[MsgType, Handler] = {}
        #: Command -> its handler (features' commands; ``GlobalServer.COMMANDS`` has the server's own).
        self.commands: Dict[str, CommandHandler] = {}
        for cls in off:
            if cls.off is not None:
                for mtype in cls.messages:
                    self.handlers[mtype] = functools.partial(self._refuse_message, cls)
                for cmd in cls.commands:
                    self.commands[cmd] = functools.partial(self._refuse_command, cls)
        for feature in self.attached:
            for mtype in feature.messages:
                self.handlers[mtype] = feature.handle
            for cmd, handler in feature.commands.items():
                self.commands[cmd] = functools.partial(handler, feature)
        self._refuse = _overriding(self.attached, "refuse")
        self._state_for = _overriding(self.attached, "state_for")
        self._take_push = _overriding(self.attached, "take_push")
        self._reply_meta = _overriding(self.attached, "reply_meta")
        self._round_complete = _overriding(self.attached, "on_round_complete")
        self._client_stop = _overriding(self.attached, "on_client_stop")
        self._all_stopped = _overriding(self.attached, "on_all_stopped")
        self._leave = _overriding(self.attached, "on_leave")
        self._samples = _overriding(self.attached, "samples")

    # -- which features ------------------------------------------------------------------------
    def get(self, cls: Type[F]) -> Optional[F]:
        """The attached feature of class ``cls``, or None when it is off."""
        for feature in self.attached:
            if isinstance(feature, cls):
                return feature
        return None

    def samples(self) -> List["Sample"]:
        """Every attached feature's figures (:meth:`ServerFeature.samples`)."""
        return [s for fn in self._samples for s in fn()]

    def require(self, cls: Type[F]) -> F:
        """The attached feature of class ``cls``; GeoMXError (its :attr:`~ServerFeature.off` text) if off."""
        feature = self.get(cls)
        if feature is None:
            raise GeoMXError(self._off_text(cls))
        return feature

    @property
    def whole_keys(self) -> bool:
        """Whether an attached feature needs each key's rounds whole (no cut-through slices)."""
        return any(f.whole_keys for f in self.attached)

    def _off_text(self, cls: Type[ServerFeature]) -> str:
        return (cls.off or f"{cls.name} is off").format(server=self.server)

    def _refuse_message(self, cls: Type[ServerFeature], msg: Message, origin: "Origin", key_checked: bool) -> bool:
        raise ProtocolError(self._off_text(cls))

    def _refuse_command(self, cls: Type[ServerFeature], msg: Message, link: "Link", identity: bytes,
                        master: bool) -> None:
        raise GeoMXError(self._off_text(cls))

    # -- the hooks, as the round engine calls them ---------------------------------------------
    def refusal(self, msg: Message, ks: "KeyState") -> Optional[str]:
        for refuse in self._refuse:
            error = refuse(msg, ks)
            if error is not None:
                return error
        return None

    def state_for(self, msg: Message, ks: "KeyState") -> "KeyState":
        for state_for in self._state_for:
            ks = state_for(msg, ks)
        return ks

    def take_push(self, msg: Message, ks: "KeyState", client: "Client", link: "Link", identity: bytes) -> bool:
        return any(take(msg, ks, client, link, identity) for take in self._take_push)

    def reply_meta(self, req: Message, client: "Client", meta: Optional[dict]) -> Optional[dict]:
        """``meta`` (the server's own, or None) with what the features add to a reply to ``req``."""
        if not self._reply_meta:
            return meta
        out: Dict[str, Any] = dict(meta) if meta else {}
        for add in self._reply_meta:
            add(req, client, out)
        return out or None

    def round_complete(self, ks: "KeyState", r: Optional[int], value: np.ndarray) -> None:
        for hook in self._round_complete:
            hook(ks, r, value)

    def client_stop(self, client: "Client") -> None:
        for hook in self._client_stop:
            hook(client)

    def all_stopped(self) -> None:
        for hook in self._all_stopped:
            hook()

    def leave(self, reason: str, failed: bool) -> None:
        for hook in self._leave:
            hook(reason, failed)
