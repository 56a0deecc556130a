"""Codecs by name: ``register(name)`` to add one, ``create(params)`` to build one from the user's dict."""
from __future__ import annotations

from typing import Any, Callable, Mapping, TypeVar

from geomx.compression.base import LINKS, Codec

__all__ = ["codec_class", "create", "known_types", "register"]

_REGISTRY: dict[str, type[Codec]] = {}

C = TypeVar("C", bound=type[Codec])


def register(name: str) -> Callable[[C], C]:
    """Class decorator adding a :class:`Codec` subclass to the registry under ``name``.

    Parameters
    ----------
    name : str
        Registry name, lower case (the ``type`` users pass).

    Returns
    -------
    callable
        The decorator; it sets ``cls.name`` and returns ``cls`` unchanged.

    Raises
    ------
    ValueError
        If ``name`` is not a lower-case identifier or is taken by another class.
    TypeError
        If the decorated object is not a Codec subclass.
    """
    if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
        raise ValueError(f"codec names are lower-case identifiers, got {name!r}")

    def add(cls: C) -> C:
        if not (isinstance(cls, type) and issubclass(cls, Codec)):
            raise TypeError(f"only Codec subclasses can be registered, got {cls!r}")
        taken = _REGISTRY.get(name)
        if taken is not None and taken is not cls:
            raise ValueError(f"codec name {name!r} is already taken by {taken.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def known_types() -> list[str]:
    """Registered codec names, sorted."""
    return sorted(_REGISTRY)


def codec_class(name: str) -> type[Codec]:
    """The class registered as ``name`` (its declared capabilities: ``Codec.encodes``, ``Codec.sparse``);
    KeyError if there is none."""
    return _REGISTRY[name]


def create(params: Mapping[str, Any], *, link: str = "wan") -> Codec:
    """Build a codec from the dict a user gives ``kv.set_gradient_compression``.

    Parameters
    ----------
    params : Mapping
        ``{"type": name, ...}``, e.g. ``{"type": "bsc", "threshold": 0.01}``. Each codec
        validates its own keys (see its class); none accepts keys it does not know.
    link : {"wan", "party"}, optional
        The link the codec serves (default ``"wan"``, local server <-> global server); it
        decides, with the tensor size, how each tensor travels (:meth:`Codec.for_tensor`).

    Returns
    -------
    Codec
        A fresh codec (empty per-key state).

    Raises
    ------
    ValueError
        If ``params`` is not a mapping with a string ``type``, the type is unknown (the message
        lists the known ones), a parameter is missing or out of range (the message names it),
        or an unknown key is present.
    """
    if not isinstance(params, Mapping):
        raise ValueError(f"gradient compression parameters must be a dict, got {type(params).__name__}")
    if link not in LINKS:
        raise ValueError(f"link must be one of {LINKS}, got {link!r}")
    if "type" not in params:
        raise ValueError(f"gradient compression parameters need a 'type' (one of {known_types()})")
    kind = params["type"]
    if not isinstance(kind, str):
        raise ValueError(f"compression 'type' must be a string, got {kind!r}")
    cls = _REGISTRY.get(kind.strip().lower())
    if cls is None:
        raise ValueError(f"unknown compression type {kind!r}; known types: {', '.join(known_types())}")
    rest = {k: v for k, v in params.items() if k != "type"}
    return cls.from_params(rest, link=link)
