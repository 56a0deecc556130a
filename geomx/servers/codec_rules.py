"""Which gradient codec may serve with which of the global server's features: one table, read by
``GlobalServer._set_compression`` when the master worker chooses a codec.

Each rule names a feature, says when it is on (its server feature is attached: geomx/servers/features) and
which codecs it can carry, by the capabilities a codec declares (``Codec.encodes``, ``Codec.sparse``),
never by its name: a new codec gets the right answers by declaring what it does. Rules that depend on the
synchronization algorithm (an optimizer in front of a sparse codec) live with the algorithm
(``GlobalPolicy.check_codec``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..errors import GeoMXError
from .features import DGTReception, TSRoot

if TYPE_CHECKING:
    from ..compression import Codec
    from .global_server import GlobalServer


@dataclass(frozen=True)
class CodecRule:
    """``feature`` is on (``applies``) and carries only the codecs ``carries`` accepts; otherwise
    ``refusal`` (formatted with the codec's name as ``codec`` and the server as ``server``) says why."""

    feature: str
    applies: Callable[["GlobalServer"], bool]
    carries: Callable[["Codec"], bool]
    refusal: str


RULES = (
    CodecRule("ENABLE_INTER_TS", lambda server: server.features.get(TSRoot) is not None,
              lambda codec: not codec.sparse,
              "{codec} cannot be combined with ENABLE_INTER_TS=1: TSEngine sums and relays dense tensors between "
              "parties (use 'fp16' with float16 keys, or unset ENABLE_INTER_TS)"),
    CodecRule("ENABLE_DGT", lambda server: server.features.get(DGTReception) is not None,
              lambda codec: not codec.encodes,
              "gradient compression '{codec}' cannot be combined with DGT (ENABLE_DGT={server.cfg.dgt.mode} on the "
              "global server): DGT sends dense blocks of the parties' sums; unset one of them"),
)


def check(server: "GlobalServer", codec: "Codec") -> None:
    """Raise GeoMXError naming the first feature on ``server`` that cannot carry ``codec``."""
    for rule in RULES:
        if rule.applies(server) and not rule.carries(codec):
            raise GeoMXError(rule.refusal.format(codec=codec.name, server=server))
