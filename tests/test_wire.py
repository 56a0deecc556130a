"""geomx.wire: encode/decode round trips and every rejection of :func:`decode` (plus a fuzz property:
nothing a peer sends makes decode raise anything but ProtocolError)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import zmq
from helpers import HEADER, header
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geomx import wire
from geomx.errors import ProtocolError
from geomx.wire import DTYPES, HEADER_SIZE, MAGIC, MAX_ELEMENTS, MAX_META_BYTES, Flag, Message, MsgType, decode, encode

pytestmark = pytest.mark.unit

def as_bytes(frames):
    return [bytes(f) for f in frames]


def rejected(frames, match: str, **kw) -> str:
    with pytest.raises(ProtocolError, match=match) as info:
        decode(frames, **kw)
    return str(info.value)


# -- round trips ----------------------------------------------------------------------------------

def test_header_size_matches_layout():
    assert HEADER_SIZE == HEADER.size == 60


@pytest.mark.parametrize("code", sorted(DTYPES))
def test_round_trip_every_dtype(code):
    dt = DTYPES[code]
    data = (np.arange(37) * 3 - 50).astype(dt)
    msg = Message(MsgType.PUSH, sender=3, req_id=77, key=12, priority=-4, version=9, data=data)
    frames = encode(msg)
    assert len(frames) == 2
    header_fields = HEADER.unpack(bytes(frames[0]))
    assert header_fields[0] == MAGIC and header_fields[2] == code
    for form in (frames, as_bytes(frames), [memoryview(bytes(f)) for f in frames]):
        out = decode(form)
        assert out.type == MsgType.PUSH
        assert (out.sender, out.req_id, out.key, out.priority, out.version) == (3, 77, 12, -4, 9)
        assert (out.offset, out.numel, out.total) == (0, 37, 37)
        assert out.dtype == code and out.np_dtype == dt
        assert out.data.dtype == dt
        np.testing.assert_array_equal(out.data, data)
        assert out.meta is None


def test_round_trip_zmq_frames(zmq_ctx):
    """decode takes the zmq.Frame objects a socket returns with copy=False."""
    a, b = zmq_ctx.socket(zmq.PAIR), zmq_ctx.socket(zmq.PAIR)
    a.bind("inproc://wire-test")
    b.connect("inproc://wire-test")
    data = np.linspace(-1, 1, 1001, dtype=np.float32)
    a.send_multipart(encode(Message(MsgType.PUSHPULL, key=5, meta={"x": [1, 2]}, data=data)), copy=False)
    frames = b.recv_multipart(copy=False)
    out = decode(frames)
    assert out.type == MsgType.PUSHPULL and out.meta == {"x": [1, 2]}
    np.testing.assert_array_equal(out.data, data)


def test_round_trip_meta_only():
    meta = {"cmd": "set_optimizer", "spec": {"name": "sgd", "params": {"lr": 0.1}}, "list": [1, "a", None],
            "unicode": "Zürich ✓", "flag": True}
    frames = encode(Message(MsgType.COMMAND, req_id=4, meta=meta))
    assert len(frames) == 2
    out = decode(as_bytes(frames))
    assert out.type == MsgType.COMMAND and out.meta == meta and out.data is None
    assert out.dtype == 0 and out.numel == 0


def test_round_trip_meta_and_data():
    data = np.arange(6, dtype=np.int64)
    out = decode(as_bytes(encode(Message(MsgType.RESPONSE, meta={"k": 1}, data=data))))
    assert out.meta == {"k": 1}
    np.testing.assert_array_equal(out.data, data)


def test_round_trip_empty_meta_object():
    out = decode(as_bytes(encode(Message(MsgType.BARRIER, meta={}))))
    assert out.meta == {}


@pytest.mark.parametrize("mtype", list(MsgType))
def test_round_trip_header_only(mtype):
    frames = encode(Message(mtype, sender=-1, req_id=2**64 - 1, key=2**63 - 1))
    assert len(frames) == 1
    out = decode(frames)
    assert out.type == mtype and out.sender == -1 and out.req_id == 2**64 - 1 and out.key == 2**63 - 1
    assert out.meta is None and out.data is None


@pytest.mark.parametrize("code", sorted(DTYPES))
def test_round_trip_empty_data(code):
    frames = encode(Message(MsgType.PUSH, key=1, data=np.zeros(0, dtype=DTYPES[code])))
    assert len(frames) == 2 and len(bytes(frames[1])) == 0
    out = decode(as_bytes(frames))
    assert out.data is not None and out.data.size == 0 and out.data.dtype == DTYPES[code]
    assert out.numel == 0 and out.total == 0


def test_round_trip_slice():
    full = np.arange(100, dtype=np.float32)
    part = full[40:65]
    out = decode(as_bytes(encode(Message(MsgType.PUSH, key=3, offset=40, total=100, data=part))))
    assert (out.offset, out.numel, out.total) == (40, 25, 100)
    np.testing.assert_array_equal(out.data, part)
    # Without an explicit total, the slice ends the key.
    out = decode(as_bytes(encode(Message(MsgType.PUSH, key=3, offset=75, data=full[75:]))))
    assert (out.offset, out.numel, out.total) == (75, 25, 100)


def test_slice_without_data():
    """A PULL names its slice in the header alone."""
    out = decode(encode(Message(MsgType.PULL, key=8, offset=10, numel=5, total=20, dtype=1)))
    assert (out.offset, out.numel, out.total, out.dtype) == (10, 5, 20, 1) and out.data is None


def test_error_reply_answers_the_request_it_refuses():
    """An ERROR names the refused request (id and slice of its key) and carries the reason, across the wire."""
    req = Message(MsgType.PUSH, sender=9, req_id=77, key=4, offset=40, total=100, version=3,
                  data=np.ones(25, np.float32))
    out = decode(as_bytes(encode(wire.error_reply(req, "gs0: key 4 was never initialised"))))
    assert out.type == MsgType.ERROR
    assert (out.req_id, out.key, out.offset, out.total) == (77, 4, 40, 100)
    assert out.meta == {"error": "gs0: key 4 was never initialised"} and out.data is None


def test_non_contiguous_and_multidimensional_data_is_flattened():
    a = np.arange(24, dtype=np.float64).reshape(4, 6)
    for data in (a, a[:, ::2], a.T):
        out = decode(as_bytes(encode(Message(MsgType.PUSH, data=data))))
        np.testing.assert_array_equal(out.data, np.ascontiguousarray(data).reshape(-1))


def test_big_endian_input_is_sent_as_little_endian_or_refused():
    data = np.arange(5, dtype=">f4")
    try:
        frames = encode(Message(MsgType.PUSH, data=data))
    except ProtocolError:
        return
    np.testing.assert_array_equal(decode(as_bytes(frames)).data, data.astype("<f4"))


def test_received_data_is_read_only():
    out = decode(as_bytes(encode(Message(MsgType.PUSH, data=np.ones(4, np.float32)))))
    with pytest.raises(ValueError):
        out.data[0] = 2


@pytest.mark.parametrize("dtype", [np.complex64, np.bool_, np.int16, np.uint32, object])
def test_encode_refuses_other_dtypes(dtype):
    with pytest.raises(ProtocolError, match="cannot be sent"):
        encode(Message(MsgType.PUSH, data=np.zeros(3, dtype=dtype)))


def test_meta_field():
    msg = Message(MsgType.REGISTER, meta={"port": 5, "rate": 2, "flag": True, "name": "x"})
    assert wire.meta_field(msg, "port", int) == 5
    assert wire.meta_field(msg, "rate", float) == 2.0
    assert wire.meta_field(msg, "missing", int, 7) == 7
    with pytest.raises(ProtocolError, match="'missing' is missing"):
        wire.meta_field(msg, "missing", int)
    with pytest.raises(ProtocolError, match="must be int"):
        wire.meta_field(msg, "flag", int)  # a bool is not an int on the wire
    with pytest.raises(ProtocolError, match="must be str"):
        wire.meta_field(msg, "port", str)


# -- rejections -----------------------------------------------------------------------------------

def good_push(n=4, dtype=np.float32, meta=None):
    return as_bytes(encode(Message(MsgType.PUSH, key=1, meta=meta, data=np.arange(n, dtype=dtype))))


def test_reject_empty_message():
    rejected([], "empty message")


@pytest.mark.parametrize("size", [0, 1, 10, HEADER_SIZE - 1, HEADER_SIZE + 1, 200])
def test_reject_header_size(size):
    msg = rejected([b"G" * size], f"header is {size} bytes, expected {HEADER_SIZE}")
    assert str(HEADER_SIZE) in msg


def test_reject_truncated_header_of_real_message():
    frames = good_push()
    rejected([frames[0][:-1], frames[1]], "header is")


@pytest.mark.parametrize("magic", [b"GMX0", b"\0\0\0\0", b"gmx1", b"HTTP"])
def test_reject_bad_magic(magic):
    rejected([header(magic=magic)], "bad magic")


@pytest.mark.parametrize("mtype", [0, 12, 15, 23, 31, 34, 255])  # 11 is ADMITTED, 22 DGT_BLOCK
def test_reject_unknown_type(mtype):
    rejected([HEADER.pack(MAGIC, mtype, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)], f"unknown message type {mtype}")


@pytest.mark.parametrize("dtype", [7, 8, 100, 255])
def test_reject_unknown_dtype(dtype):
    rejected([header(dtype=dtype)], f"unknown dtype code {dtype}")


@pytest.mark.parametrize("flags", [8, 0x100, 0xFFFF, 8 | 1])
def test_reject_unknown_flags(flags):
    rejected([header(flags=flags)], "unknown flag bits")


def test_payload_flag_needs_data_described_by_meta():
    rejected([header(flags=4)], "payload flag without a data frame")
    raw = np.zeros(8, np.uint8)
    meta = b'{"x":1}'
    rejected([header(flags=4 | 2 | 1, dtype=6, numel=100, total=100), meta, raw.tobytes()],
             "described by meta")
    rejected([header(flags=4 | 2 | 1, dtype=1, numel=100, total=100), b'{"payload":{}}', raw.tobytes()],
             "described by meta")
    msg = decode([header(flags=4 | 2 | 1, dtype=6, numel=100, total=100), b'{"payload":{}}', raw.tobytes()])
    assert msg.payload and msg.numel == 100 and msg.data.size == 8


@pytest.mark.parametrize("flags,nframes", [
    (0, 2), (0, 3), (int(Flag.HAS_META), 1), (int(Flag.HAS_META), 3), (int(Flag.HAS_DATA), 1),
    (int(Flag.HAS_META | Flag.HAS_DATA), 2), (int(Flag.HAS_META | Flag.HAS_DATA), 4),
])
def test_reject_frame_count_mismatch(flags, nframes):
    frames = [header(flags=flags, dtype=1)] + [b"{}"] * (nframes - 1)
    expected = 1 + bool(flags & 1) + bool(flags & 2)
    rejected(frames, f"{nframes} frames, header announces {expected}")


def test_reject_negative_key():
    rejected([header(key=-1)], "negative key")


@pytest.mark.parametrize("offset,numel,total", [
    (0, 5, 4), (10, 1, 10), (2**63, 2**63, 2**64 - 1), (0, MAX_ELEMENTS + 1, MAX_ELEMENTS + 1),
    (0, 0, MAX_ELEMENTS + 1), (MAX_ELEMENTS, 1, MAX_ELEMENTS),
])
def test_reject_bad_slice(offset, numel, total):
    rejected([header(offset=offset, numel=numel, total=total)], "bad slice")


def test_accept_slice_at_limit():
    out = decode([header(offset=MAX_ELEMENTS - 1, numel=1, total=MAX_ELEMENTS)])
    assert out.offset + out.numel == out.total == MAX_ELEMENTS


@pytest.mark.parametrize("nbytes", [0, 15, 17, 64])
def test_reject_data_length_mismatch(nbytes):
    frames = good_push(4)  # 4 x float32 = 16 bytes
    msg = rejected([frames[0], b"\0" * nbytes], f"data frame is {nbytes} bytes, header says 4 x float32 = 16")
    assert "16" in msg


def test_reject_data_length_mismatch_per_dtype():
    for code, dt in DTYPES.items():
        h = header(dtype=code, flags=int(Flag.HAS_DATA), numel=3, total=3)
        decode([h, b"\0" * (3 * dt.itemsize)])
        if dt.itemsize > 1:
            rejected([h, b"\0" * 3], "data frame is 3 bytes")


def test_reject_data_without_dtype():
    rejected([header(dtype=0, flags=int(Flag.HAS_DATA), numel=1, total=1), b"\0" * 4], "without a dtype")


def test_reject_data_over_message_limit():
    frames = good_push(1024)  # 4096 bytes
    decode(frames, max_message_bytes=4096)
    rejected(frames, "exceeds the limit of 4095", max_message_bytes=4095)


def test_reject_oversized_meta():
    h = header(flags=int(Flag.HAS_META))
    big = b'{"a":"' + b"x" * MAX_META_BYTES + b'"}'
    rejected([h, big], f"meta frame of {len(big)} bytes exceeds {MAX_META_BYTES}")
    # Exactly at the limit is fine.
    exact = b'{"a":"' + b"x" * (MAX_META_BYTES - 8) + b'"}'
    assert len(exact) == MAX_META_BYTES
    assert len(decode([h, exact]).meta["a"]) == MAX_META_BYTES - 8


@pytest.mark.parametrize("raw", [b"", b"{", b"not json", b"{'a': 1}", b"\xff\xfe{}", b'{"a": 1} trailing',
                                 b"\x00"])
def test_reject_non_json_meta(raw):
    rejected([header(flags=int(Flag.HAS_META)), raw], "meta frame is not JSON")


@pytest.mark.parametrize("raw", [b"[]", b"[1,2]", b"1", b"null", b'"text"', b"true", b"3.5"])
def test_reject_non_object_meta(raw):
    rejected([header(flags=int(Flag.HAS_META)), raw], "must be a JSON object")


@pytest.mark.parametrize("raw", [b"[" * 100_000, b'{"a":' * 50_000, b"[" * (MAX_META_BYTES - 1)])
def test_reject_deeply_nested_meta(raw):
    """A hostile, deeply nested meta frame must be a ProtocolError, not a RecursionError that would
    escape the event loop and kill the node."""
    rejected([header(flags=int(Flag.HAS_META)), raw], "meta frame")


def test_meta_checked_before_data():
    h = header(flags=int(Flag.HAS_META | Flag.HAS_DATA), dtype=1, numel=1, total=1)
    rejected([h, b"nope", b"\0" * 4], "not JSON")
    out = decode([h, b'{"ok":1}', b"\0" * 4])
    assert out.meta == {"ok": 1} and out.data.tolist() == [0.0]


# -- fuzzing --------------------------------------------------------------------------------------

def _decode_never_crashes(frames) -> None:
    try:
        msg = decode(frames, max_message_bytes=1 << 20)
    except ProtocolError:
        return
    # Whatever passed validation is self-consistent.
    assert isinstance(msg.type, MsgType)
    assert msg.key >= 0 and msg.offset + msg.numel <= msg.total
    if msg.data is not None:
        assert msg.data.size == msg.numel and msg.data.dtype == DTYPES[msg.dtype]
    if msg.meta is not None:
        assert isinstance(msg.meta, dict)


# GEOMX_FUZZ_EXAMPLES raises the budget for a long run (see tests/test_fuzz.py).
_LONG = int(os.environ.get("GEOMX_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=max(400, _LONG), deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.lists(st.binary(max_size=200), max_size=5))
def test_fuzz_random_frames(frames):
    _decode_never_crashes(frames)


@FUZZ
@given(st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE), st.lists(st.binary(max_size=64), max_size=3))
def test_fuzz_random_headers(head, rest):
    _decode_never_crashes([head, *rest])


@st.composite
def plausible_messages(draw):
    """Headers with the right magic and mostly valid fields, so fuzzing gets past the first checks."""
    flags = draw(st.integers(0, 3) | st.integers(0, 0xFFFF))
    mtype = draw(st.sampled_from([int(t) for t in MsgType]) | st.integers(0, 255))
    dtype = draw(st.sampled_from([0, *DTYPES]) | st.integers(0, 255))
    numel = draw(st.integers(0, 40) | st.integers(0, 2**64 - 1))
    offset = draw(st.integers(0, 40) | st.integers(0, 2**64 - 1))
    total = draw(st.just(offset + numel) | st.integers(0, 2**64 - 1)) % 2**64
    key = draw(st.integers(-2**63, 2**63 - 1))
    head = HEADER.pack(MAGIC, mtype, dtype, flags, draw(st.integers(-2**31, 2**31 - 1)),
                        draw(st.integers(0, 2**64 - 1)), key, offset, numel, total,
                        draw(st.integers(-2**31, 2**31 - 1)), draw(st.integers(0, 2**32 - 1)))
    json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                               lambda inner: st.lists(inner, max_size=3)
                               | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=5)
    meta = draw(st.builds(lambda v: json.dumps(v).encode(), json_values) | st.binary(max_size=50))
    itemsize = DTYPES[dtype].itemsize if dtype in DTYPES else 4
    data = draw(st.just(b"\1" * (numel * itemsize if numel <= 40 else 8)) | st.binary(max_size=80))
    frames = [head]
    n_extra = draw(st.sampled_from([bool(flags & 1) + bool(flags & 2), 0, 1, 2, 3]))
    frames += [meta, data, b"x"][:n_extra] if flags & 1 else [data, meta, b"x"][:n_extra]
    return frames


@settings(max_examples=max(500, _LONG), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plausible_messages())
def test_fuzz_plausible_messages(frames):
    _decode_never_crashes(frames)


@FUZZ
@given(st.sampled_from(sorted(DTYPES)), st.integers(0, 50), st.integers(0, 200), st.data())
def test_fuzz_bit_flips_of_valid_messages(code, n, offset, data):
    msg = Message(MsgType.PUSH, key=data.draw(st.integers(0, 2**62)), offset=offset,
                  meta=data.draw(st.none() | st.just({"a": [1, 2, {"b": None}]})),
                  data=np.arange(n).astype(DTYPES[code]))
    frames = [bytearray(bytes(f)) for f in encode(msg)]
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(frames) - 1))
        if not frames[i]:
            continue
        j = data.draw(st.integers(0, len(frames[i]) - 1))
        frames[i][j] ^= 1 << data.draw(st.integers(0, 7))
    _decode_never_crashes([bytes(f) for f in frames])


@FUZZ
@given(st.sampled_from(sorted(DTYPES)), st.integers(0, 64), st.integers(0, 1000), st.integers(0, 1000))
def test_fuzz_round_trip(code, n, offset, extra):
    dt = DTYPES[code]
    arr = np.frombuffer(np.random.default_rng(n).bytes(n * dt.itemsize), dtype=dt)
    msg = Message(MsgType.PUSH, key=offset, offset=offset, total=offset + n + extra, data=arr)
    out = decode(as_bytes(encode(msg)))
    assert (out.offset, out.numel, out.total) == (offset, n, offset + n + extra)
    assert out.data.tobytes() == arr.tobytes()  # bytewise: NaN payloads survive too
