"""Wire format: one fixed binary header, an optional JSON meta frame, an optional raw array frame.

Nothing received is ever unpickled or evaluated. :func:`decode` checks every field (magic, message
type, dtype whitelist, flag bits, frame count, meta size and type, data length against numel and
dtype, slice bounds) and raises :class:`~geomx.errors.ProtocolError` naming the problem, so a node
can log and drop a bad message and keep serving.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import math
import struct
from typing import Any, List, Optional, Sequence

import numpy as np

from .errors import ProtocolError

MAGIC = b"GMX1"
# magic, type, dtype, flags, sender, request id, key, offset, numel, total, priority, version
_HEADER = struct.Struct("<4sBBHiQqQQQiI")
HEADER_SIZE = _HEADER.size
MAX_META_BYTES = 1 << 20
MAX_ELEMENTS = 1 << 34
# Integers in meta must fit a signed 64-bit integer: no field needs more, and a 4000-digit number
# costs the parser quadratic time and every consumer a range check it may forget.
MAX_META_INT = (1 << 63) - 1


class MsgType(enum.IntEnum):
    # membership (node <-> scheduler)
    REGISTER = 1
    REGISTER_ACK = 2
    BARRIER = 3
    BARRIER_ACK = 4
    HEARTBEAT = 5
    HEARTBEAT_ACK = 6
    BYE = 7
    PEER_DEAD = 8
    PEER_LEFT = 9  # a node is gone but the tier carries on (a party under MixedSync)
    POLICY = 10  # node -> scheduler: how to treat lost nodes
    # server -> scheduler: the client list of a REGISTER_ACK is in force (meta "token": the party's
    # local server that rejoined the tier, which is acknowledged only once every server admits it)
    ADMITTED = 11
    # key-value (client <-> server)
    INIT = 16
    PUSH = 17
    PULL = 18
    PUSHPULL = 19
    COMMAND = 20
    STOP = 21
    # One block of a DGT push (local server -> global server; geomx.dgt). Not a request: no reply.
    DGT_BLOCK = 22
    RESPONSE = 32
    ERROR = 33
    # TSEngine (geomx/tsengine): the round travels in the header's version field.
    TS_ASK_PUSH = 40  # node -> scheduler: I hold a partial sum of (key, round); whom do I send it to?
    TS_PUSH_TO = 41  # scheduler -> node: send it to meta rank/host/port
    TS_ASK_RELAY = 42  # node -> scheduler: I hold the model of (key, round) (+ last hop's throughput)
    TS_RELAY_TO = 43  # scheduler -> node: send it to meta rank/host/port, or to nobody (no meta)
    TS_REPORT = 44  # node -> scheduler: a measured throughput (after a partial-sum hop)
    TS_MERGE = 45  # peer -> peer: a partial sum of meta count contributions
    TS_MODEL = 46  # peer -> peer: the model of (key, round)
    TS_ACK = 47  # peer -> peer: TS_MERGE / TS_MODEL taken (or meta error)


class Flag(enum.IntFlag):
    NONE = 0
    HAS_META = 1
    HAS_DATA = 2
    # The data frame is an encoded gradient (geomx.compression frames: bytes, described by
    # meta["payload"]); numel/offset/total still describe the logical slice it encodes.
    PAYLOAD = 4


# dtype code <-> numpy dtype; 0 means "no data". Only plain numeric types cross the wire.
DTYPES = {
    1: np.dtype("<f4"),
    2: np.dtype("<f2"),
    3: np.dtype("<f8"),
    4: np.dtype("<i4"),
    5: np.dtype("<i8"),
    6: np.dtype("u1"),
}
DTYPE_CODES = {dt: code for code, dt in DTYPES.items()}


def dtype_code(dtype: Any) -> int:
    try:
        return DTYPE_CODES[np.dtype(dtype)]
    except KeyError:
        raise ProtocolError(f"dtype {np.dtype(dtype)} cannot be sent (allowed: "
                            f"{', '.join(str(d) for d in DTYPES.values())})") from None


@dataclasses.dataclass
class Message:
    type: MsgType
    sender: int = -1
    req_id: int = 0
    key: int = 0
    offset: int = 0
    numel: int = 0
    total: int = 0
    priority: int = 0
    version: int = 0
    dtype: int = 0
    meta: Optional[dict] = None
    data: Optional[np.ndarray] = None  # 1-D; read-only when it came from the network
    payload: bool = False  # data is an encoded (compressed) gradient; see Flag.PAYLOAD

    @property
    def np_dtype(self) -> Optional[np.dtype]:
        return DTYPES.get(self.dtype)


def error_reply(request: Message, error: str) -> Message:
    """The ERROR answering ``request``: its request id and key range, the reason in ``meta["error"]``
    (what the requester's client raises as a RemoteError)."""
    return Message(MsgType.ERROR, req_id=request.req_id, key=request.key, offset=request.offset,
                   total=request.total, meta={"error": error})


# Plain ints for the per-message paths: arithmetic on enum members costs microseconds each.
_HAS_META = int(Flag.HAS_META)
_HAS_DATA = int(Flag.HAS_DATA)
_PAYLOAD = int(Flag.PAYLOAD)
_KNOWN_FLAGS = _HAS_META | _HAS_DATA | _PAYLOAD
_MSG_TYPES = {int(t): t for t in MsgType}


def encode(msg: Message) -> List[Any]:
    """Frames for ``msg``: header, then meta (if any), then the array buffer (sent zero-copy)."""
    flags = 0
    frames: List[Any] = []
    if msg.meta is not None:
        flags |= _HAS_META
        try:
            # allow_nan=False: the receiver refuses NaN and Infinity (see decode), so fail here, naming it.
            frames.append(json.dumps(msg.meta, separators=(",", ":"), allow_nan=False).encode())
        except ValueError as exc:
            raise ProtocolError(f"{msg.type.name}: meta holds a number that is not finite ({exc}): "
                                f"{_bad_number(msg.meta) or '?'}") from None
    dtype = msg.dtype
    numel = msg.numel
    if msg.data is not None:
        data = msg.data
        if data.ndim != 1 or not data.flags.c_contiguous:
            data = np.ascontiguousarray(data).reshape(-1)
        flags |= _HAS_DATA
        dtype = dtype_code(data.dtype)
        if msg.payload:
            flags |= _PAYLOAD  # numel stays the logical size of the encoded slice
        else:
            numel = data.size
        frames.append(memoryview(data).cast("B") if data.size else b"")
    total = msg.total if msg.total else msg.offset + numel
    header = _HEADER.pack(MAGIC, msg.type, dtype, flags, msg.sender, msg.req_id, msg.key,
                          msg.offset, numel, total, msg.priority, msg.version)
    return [header, *frames]


def _buffer(frame: Any) -> memoryview:
    if isinstance(frame, (bytes, bytearray, memoryview)):
        return memoryview(frame)
    return frame.buffer  # zmq.Frame


def decode(frames: Sequence[Any], max_message_bytes: int = 1 << 31) -> Message:
    """Parse and validate one received message; raise ProtocolError with the reason if it is bad."""
    if not frames:
        raise ProtocolError("empty message")
    head = _buffer(frames[0])
    if len(head) != HEADER_SIZE:
        raise ProtocolError(f"header is {len(head)} bytes, expected {HEADER_SIZE}")
    (magic, mtype, dtype, flags, sender, req_id, key, offset, numel, total, priority,
     version) = _HEADER.unpack(head)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}")
    known = _MSG_TYPES.get(mtype)
    if known is None:
        raise ProtocolError(f"unknown message type {mtype}")
    mtype = known
    if flags & ~_KNOWN_FLAGS:
        raise ProtocolError(f"unknown flag bits {flags:#x}")
    expected = 1 + bool(flags & _HAS_META) + bool(flags & _HAS_DATA)
    if len(frames) != expected:
        raise ProtocolError(f"{len(frames)} frames, header announces {expected}")
    if dtype != 0 and dtype not in DTYPES:
        raise ProtocolError(f"unknown dtype code {dtype}")
    if key < 0:
        raise ProtocolError(f"negative key {key}")
    if numel > MAX_ELEMENTS or total > MAX_ELEMENTS or offset + numel > total:
        raise ProtocolError(f"bad slice: offset {offset} + numel {numel} > total {total}")
    msg = Message(mtype, sender, req_id, key, offset, numel, total, priority, version, dtype)
    i = 1
    if flags & _HAS_META:
        raw = _buffer(frames[i])
        i += 1
        if len(raw) > MAX_META_BYTES:
            raise ProtocolError(f"meta frame of {len(raw)} bytes exceeds {MAX_META_BYTES}")
        try:
            meta = json.loads(bytes(raw).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ProtocolError(f"meta frame is not JSON: {exc}") from None
        except RecursionError:
            # A hostile '[[[[...' frame; must not escape and stop the node's event loop.
            raise ProtocolError("meta frame is nested too deeply") from None
        if not isinstance(meta, dict):
            raise ProtocolError("meta frame must be a JSON object")
        bad = _bad_number(meta)
        if bad is not None:
            # The header is sound: the node answers the request with this error (MetaError.request).
            raise MetaError(f"{mtype.name}: {bad}", msg)
        msg.meta = meta
    if flags & _PAYLOAD and not flags & _HAS_DATA:
        raise ProtocolError("payload flag without a data frame")
    if flags & _HAS_DATA:
        if dtype == 0:
            raise ProtocolError("data frame without a dtype")
        raw = _buffer(frames[i])
        np_dtype = DTYPES[dtype]
        if flags & _PAYLOAD:
            if np_dtype != np.uint8 or not isinstance((msg.meta or {}).get("payload"), dict):
                raise ProtocolError("an encoded payload must be bytes described by meta['payload']")
            msg.payload = True
        elif len(raw) != numel * np_dtype.itemsize:
            raise ProtocolError(
                f"data frame is {len(raw)} bytes, header says {numel} x {np_dtype} = {numel * np_dtype.itemsize}")
        if len(raw) > max_message_bytes:
            raise ProtocolError(f"data frame of {len(raw)} bytes exceeds the limit of {max_message_bytes}")
        data = np.frombuffer(raw, dtype=np_dtype)
        # libzmq keeps very small messages inside its own header, not always aligned for the dtype;
        # kernels need aligned input, and such arrays are tiny, so copy them.
        msg.data = data if data.flags.aligned else data.copy()
    return msg


class MetaError(ProtocolError):
    """A message whose header is valid but whose meta is not: ``request`` (header fields only) lets the
    receiver answer a request with an ERROR instead of leaving its sender waiting."""

    def __init__(self, text: str, request: Message):
        super().__init__(text)
        self.request = request


def _bad_number(value: Any, path: str = "") -> Optional[str]:
    """What is wrong with the first non-finite float (JSON's NaN, Infinity, or 1e999, which Python reads
    as infinity) or out-of-range integer in ``value``, naming where it is; None if there is none.
    Iterative: a meta frame may be deep (the JSON parser bounds it, but not below Python's recursion limit)."""
    stack = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return f"meta field {where or 'value'} is {item}, not a finite number"
        elif isinstance(item, int) and not isinstance(item, bool):
            if not -MAX_META_INT - 1 <= item <= MAX_META_INT:
                return f"meta field {where or 'value'} is an integer outside the signed 64-bit range"
        elif isinstance(item, dict):
            stack.extend((v, f"{where}[{k!r}]" if where else repr(k)) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(item))
    return None


def meta_field(msg: Message, name: str, kind: type, default: Any = ...) -> Any:
    """A typed field of ``msg.meta``; ProtocolError if it is missing (and required) or of the wrong type."""
    meta = msg.meta or {}
    if name not in meta:
        if default is ...:
            raise ProtocolError(f"{msg.type.name}: meta field {name!r} is missing")
        return default
    value = meta[name]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"{msg.type.name}: meta field {name!r} must be {kind.__name__}")
    if kind is float and not math.isfinite(value):  # decode refuses these; a message built here may not
        raise ProtocolError(f"{msg.type.name}: meta field {name!r} is {value}, not a finite number")
    return value
